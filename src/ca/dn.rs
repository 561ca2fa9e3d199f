//! Distinguished names: the CA subject given on the command line, and the
//! extra subject fields a JITP template may reference.

use rcgen::string::PrintableString;
use rcgen::{DistinguishedName, DnType, DnValue};

/// OID of X.520 serialNumber.
pub const OID_SERIAL_NUMBER: &[u64] = &[2, 5, 4, 5];
/// OID of X.520 dnQualifier.
pub const OID_DN_QUALIFIER: &[u64] = &[2, 5, 4, 46];

/// A subject string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnError {
    /// A component without `=`.
    #[error("subject component {0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    /// An attribute the station does not know.
    #[error(
        "unknown subject attribute {0:?} (known: C, ST, L, O, OU, CN, serialNumber, dnQualifier)"
    )]
    UnknownAttribute(String),
    /// A value that cannot be encoded as the attribute requires.
    #[error("subject attribute {attr}: {reason}")]
    BadValue {
        /// Attribute name.
        attr: String,
        /// What is wrong.
        reason: String,
    },
    /// Nothing in it.
    #[error("the subject is empty")]
    Empty,
}

/// Parses `/CN=My IoT CA/O=Acme` (openssl style) or `CN=My IoT CA,O=Acme`.
pub fn parse_subject(s: &str) -> Result<DistinguishedName, DnError> {
    let s = s.trim();
    let parts: Vec<&str> = if let Some(rest) = s.strip_prefix('/') {
        rest.split('/').collect()
    } else {
        s.split(',').collect()
    };
    let mut dn = DistinguishedName::new();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| DnError::NotKeyValue(part.to_string()))?;
        let (ty, value) = attribute(key.trim(), value.trim())?;
        dn.push(ty, value);
    }
    if dn.iter().next().is_none() {
        return Err(DnError::Empty);
    }
    Ok(dn)
}

fn attribute(key: &str, value: &str) -> Result<(DnType, DnValue), DnError> {
    let utf8 = |ty| Ok((ty, DnValue::Utf8String(value.to_string())));
    match key.to_ascii_lowercase().as_str() {
        "cn" => utf8(DnType::CommonName),
        "o" => utf8(DnType::OrganizationName),
        "ou" => utf8(DnType::OrganizationalUnitName),
        "l" => utf8(DnType::LocalityName),
        "st" => utf8(DnType::StateOrProvinceName),
        "c" => Ok((DnType::CountryName, country(value)?)),
        "serialnumber" => Ok((
            DnType::CustomDnType(OID_SERIAL_NUMBER.to_vec()),
            printable("serialNumber", value, 64)?,
        )),
        "dnqualifier" => Ok((
            DnType::CustomDnType(OID_DN_QUALIFIER.to_vec()),
            printable("dnQualifier", value, usize::MAX)?,
        )),
        _ => Err(DnError::UnknownAttribute(key.to_string())),
    }
}

/// A country code: two letters, as a PrintableString.
pub fn country(value: &str) -> Result<DnValue, DnError> {
    if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(DnError::BadValue {
            attr: "C".into(),
            reason: format!("{value:?} is not a two-letter upper-case country code"),
        });
    }
    printable("C", value, 2)
}

/// A PrintableString value of at most `max` characters.
pub fn printable(attr: &str, value: &str, max: usize) -> Result<DnValue, DnError> {
    let bad = |reason: String| DnError::BadValue {
        attr: attr.to_string(),
        reason,
    };
    if value.is_empty() || value.chars().count() > max {
        return Err(bad(format!("{value:?} must be 1 to {max} characters")));
    }
    PrintableString::try_from(value)
        .map(DnValue::PrintableString)
        .map_err(|_| {
            bad(format!(
                "{value:?} has characters outside PrintableString (A-Z a-z 0-9 space '()+,-./:=?)"
            ))
        })
}

/// A UTF8String value of at most `max` characters (the X.520 upper bounds).
pub fn utf8(attr: &str, value: &str, max: usize) -> Result<DnValue, DnError> {
    if value.is_empty() || value.chars().count() > max {
        return Err(DnError::BadValue {
            attr: attr.to_string(),
            reason: format!("{value:?} must be 1 to {max} characters"),
        });
    }
    Ok(DnValue::Utf8String(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_styles() {
        for s in ["/CN=My IoT CA/O=Acme", "CN=My IoT CA, O=Acme"] {
            let dn = parse_subject(s).unwrap();
            assert_eq!(
                dn.get(&DnType::CommonName),
                Some(&DnValue::Utf8String("My IoT CA".into()))
            );
            assert_eq!(
                dn.get(&DnType::OrganizationName),
                Some(&DnValue::Utf8String("Acme".into()))
            );
        }
    }

    #[test]
    fn refuses_bad_subjects() {
        assert!(matches!(parse_subject("/CN"), Err(DnError::NotKeyValue(_))));
        assert!(matches!(
            parse_subject("/X=1"),
            Err(DnError::UnknownAttribute(_))
        ));
        assert!(matches!(
            parse_subject("/C=Germany"),
            Err(DnError::BadValue { .. })
        ));
        assert_eq!(parse_subject(" "), Err(DnError::Empty));
    }
}
