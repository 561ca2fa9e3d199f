//! Feeds arbitrary bytes to the device-link frame decoder, in pieces whose
//! sizes the input also chooses, and round-trips every frame that decodes;
//! then to the message payload decoder directly (random bytes seldom pass a
//! frame's CRC-32), and to the bundle parser, round-tripping what each accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provline::device::{bundle, decode, encode, FrameDecoder, Message};

fuzz_target!(|input: &[u8]| {
    let Some((&shape, bytes)) = input.split_first() else {
        return;
    };
    let max_frame = 2 + usize::from(shape) * 8;
    let piece = 1 + usize::from(shape % 17);
    let mut decoder = FrameDecoder::new(max_frame);
    for chunk in bytes.chunks(piece) {
        decoder.push(chunk);
        while let Some(result) = decoder.next_frame() {
            if let Ok(frame) = result {
                let wire = encode(&frame).expect("a decoded frame encodes");
                assert_eq!(decode(&wire).expect("and decodes again"), frame);
            }
        }
        assert!(decoder.buffered() < max_frame);
    }
    let _ = decode(bytes);
    if let [msg_type, s0, s1, payload @ ..] = bytes {
        let seq = u16::from_le_bytes([*s0, *s1]);
        if let Ok(message) = Message::decode_payload(*msg_type, seq, payload) {
            let mut again = Vec::new();
            message
                .encode_payload(&mut again)
                .expect("a decoded message encodes");
            assert_eq!(
                Message::decode_payload(*msg_type, seq, &again).expect("and decodes again"),
                message
            );
        }
    }
    if let Ok(entries) = bundle::parse(bytes) {
        assert_eq!(bundle::encode(&entries).expect("a parsed bundle encodes"), bytes);
    }
});
