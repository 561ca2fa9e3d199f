//! CRC-32/ISO-HDLC (the CRC of Ethernet, zlib and PNG), table-driven.
//!
//! Parameters: polynomial 0x04C11DB7 (0xEDB88320 reflected), initial value
//! 0xFFFFFFFF, input and output reflected, final XOR 0xFFFFFFFF. Check value:
//! `crc32(b"123456789") == 0xCBF43926`. The table is built at compile time.

/// The 256-entry table for the reflected polynomial 0xEDB88320.
const TABLE: [u32; 256] = make_table();

const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut index = 0usize;
    let mut value = 0u32;
    while index < 256 {
        let mut c = value;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[index] = c;
        index += 1;
        value += 1;
    }
    table
}

/// CRC-32/ISO-HDLC of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        let low = crc.to_le_bytes()[0] ^ byte;
        crc = TABLE[usize::from(low)] ^ (crc >> 8);
    }
    crc ^ 0xFFFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn check_value_of_crc32_iso_hdlc() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn bitwise_definition_agrees_with_the_table() {
        fn bitwise(data: &[u8]) -> u32 {
            let mut crc = 0xFFFF_FFFFu32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for len in [0, 1, 7, 64, 255, 1000] {
            assert_eq!(crc32(&data[..len]), bitwise(&data[..len]));
        }
    }
}
