//! The device certificate profile and issuance.
//!
//! Every field comes from here, never from a CSR: subject CN = thing name,
//! serialNumber = device serial, plus the organisation fields a JITP
//! template may reference; CA:FALSE, digitalSignature (critical),
//! clientAuth, SKI and AKI; a random serial; notBefore backdated.

use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::dn::{self, DnError, OID_DN_QUALIFIER, OID_SERIAL_NUMBER};
use super::{serial, LocalCa, BACKDATE};
use crate::keygen::PublicKey;

/// A subject field of a device certificate, by the name AWS IoT gives it in
/// a provisioning template (`AWS::IoT::Certificate::<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertField {
    /// CN: the thing name.
    CommonName,
    /// serialNumber: the device serial.
    SerialNumber,
    /// C.
    Country,
    /// O.
    Organization,
    /// OU.
    OrganizationalUnit,
    /// dnQualifier.
    DistinguishedNameQualifier,
    /// ST.
    StateName,
}

impl CertField {
    /// Every field AWS IoT lets a template reference.
    pub const ALL: [CertField; 7] = [
        CertField::CommonName,
        CertField::SerialNumber,
        CertField::Country,
        CertField::Organization,
        CertField::OrganizationalUnit,
        CertField::DistinguishedNameQualifier,
        CertField::StateName,
    ];

    /// The name in a template (after `AWS::IoT::Certificate::`).
    pub fn aws_name(self) -> &'static str {
        match self {
            CertField::CommonName => "CommonName",
            CertField::SerialNumber => "SerialNumber",
            CertField::Country => "Country",
            CertField::Organization => "Organization",
            CertField::OrganizationalUnit => "OrganizationalUnit",
            CertField::DistinguishedNameQualifier => "DistinguishedNameQualifier",
            CertField::StateName => "StateName",
        }
    }

    /// The command-line option that fills it.
    pub fn option(self) -> &'static str {
        match self {
            CertField::CommonName => "the thing name",
            CertField::SerialNumber => "the device serial",
            CertField::Country => "--subject-c",
            CertField::Organization => "--subject-o",
            CertField::OrganizationalUnit => "--subject-ou",
            CertField::DistinguishedNameQualifier => "--subject-dnq",
            CertField::StateName => "--subject-st",
        }
    }
}

/// The station's device certificate profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProfile {
    /// O.
    pub organization: Option<String>,
    /// OU.
    pub organizational_unit: Option<String>,
    /// C (two letters).
    pub country: Option<String>,
    /// ST.
    pub state: Option<String>,
    /// dnQualifier.
    pub dn_qualifier: Option<String>,
    /// Validity from issuance (notBefore is backdated on top of this).
    pub validity: Duration,
    /// How far notBefore is set back.
    pub backdate: Duration,
}

impl Default for DeviceProfile {
    fn default() -> Self {
        DeviceProfile {
            organization: None,
            organizational_unit: None,
            country: None,
            state: None,
            dn_qualifier: None,
            validity: Duration::days(3650),
            backdate: BACKDATE,
        }
    }
}

impl DeviceProfile {
    /// Whether certificates of this profile carry `field`.
    pub fn fills(&self, field: CertField) -> bool {
        match field {
            CertField::CommonName | CertField::SerialNumber => true,
            CertField::Country => self.country.is_some(),
            CertField::Organization => self.organization.is_some(),
            CertField::OrganizationalUnit => self.organizational_unit.is_some(),
            CertField::DistinguishedNameQualifier => self.dn_qualifier.is_some(),
            CertField::StateName => self.state.is_some(),
        }
    }

    /// The fixed part of every device subject, checked once: C, ST, O, OU,
    /// dnQualifier (X.520 upper bounds, PrintableString where required).
    pub fn fixed_subject(&self) -> Result<Vec<(DnType, DnValue)>, DnError> {
        let mut fields = Vec::new();
        if let Some(c) = &self.country {
            fields.push((DnType::CountryName, dn::country(c)?));
        }
        if let Some(st) = &self.state {
            fields.push((DnType::StateOrProvinceName, dn::utf8("ST", st, 128)?));
        }
        if let Some(o) = &self.organization {
            fields.push((DnType::OrganizationName, dn::utf8("O", o, 64)?));
        }
        if let Some(ou) = &self.organizational_unit {
            fields.push((DnType::OrganizationalUnitName, dn::utf8("OU", ou, 64)?));
        }
        if let Some(q) = &self.dn_qualifier {
            fields.push((
                DnType::CustomDnType(OID_DN_QUALIFIER.to_vec()),
                dn::printable("dnQualifier", q, 64)?,
            ));
        }
        Ok(fields)
    }
}

/// Why a certificate could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// A subject value cannot be encoded.
    #[error("{0}")]
    Subject(#[from] DnError),
    /// The signer or the encoder failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A certificate the CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its serial number, big-endian.
    pub serial: Vec<u8>,
    /// Its notAfter.
    pub not_after: OffsetDateTime,
}

impl IssuedCert {
    /// AWS IoT's certificate id: lower-case hex SHA-256 of the DER.
    pub fn certificate_id(&self) -> String {
        serial::hex(ring::digest::digest(&ring::digest::SHA256, &self.der).as_ref())
    }

    /// The serial number, lower-case hex.
    pub fn serial_hex(&self) -> String {
        serial::hex(&self.serial)
    }

    /// The certificate, PEM.
    pub fn pem(&self) -> String {
        crate::pem_encode("CERTIFICATE", &self.der)
    }
}

impl LocalCa {
    /// Issues a device certificate for `key`: CN = `thing_name`,
    /// serialNumber = `device_serial`, the rest from `profile`, under a
    /// fresh random certificate serial.
    pub fn issue_device(
        &self,
        profile: &DeviceProfile,
        thing_name: &str,
        device_serial: &str,
        key: &PublicKey,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, IssueError> {
        let cert_serial = self.new_serial()?;
        self.issue_device_as(profile, thing_name, device_serial, key, &cert_serial, now)
    }

    /// A fresh random certificate serial, for recording the intent before
    /// [`LocalCa::issue_device_as`] signs under it.
    pub fn new_serial(&self) -> Result<[u8; serial::SERIAL_LEN], IssueError> {
        serial::random(&self.rng)
            .map_err(|_| IssueError::Sign("no randomness for the serial".into()))
    }

    /// [`LocalCa::issue_device`] under a certificate serial chosen (and
    /// recorded) beforehand.
    pub fn issue_device_as(
        &self,
        profile: &DeviceProfile,
        thing_name: &str,
        device_serial: &str,
        key: &PublicKey,
        cert_serial: &[u8],
        now: OffsetDateTime,
    ) -> Result<IssuedCert, IssueError> {
        let mut subject = DistinguishedName::new();
        for (ty, value) in profile.fixed_subject()? {
            subject.push(ty, value);
        }
        subject.push(DnType::CommonName, dn::utf8("CN", thing_name, 64)?);
        subject.push(
            DnType::CustomDnType(OID_SERIAL_NUMBER.to_vec()),
            dn::printable("serialNumber", device_serial, 64)?,
        );
        let params = self.leaf_params(
            subject,
            cert_serial,
            profile.validity,
            profile.backdate,
            now,
        );
        self.sign_leaf(params, key)
    }

    /// End-entity parameters: CA:FALSE, digitalSignature, clientAuth,
    /// SKI/AKI, random serial, validity clamped to the CA's own.
    pub(super) fn leaf_params(
        &self,
        subject: DistinguishedName,
        cert_serial: &[u8],
        validity: Duration,
        backdate: Duration,
        now: OffsetDateTime,
    ) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(cert_serial.to_vec().into());
        params.not_before = now - backdate;
        params.not_after = (now + validity).min(self.not_after);
        params
    }

    pub(super) fn sign_leaf(
        &self,
        params: CertificateParams,
        key: &PublicKey,
    ) -> Result<IssuedCert, IssueError> {
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        Ok(IssuedCert {
            der: cert.der().to_vec(),
            serial: params
                .serial_number
                .map(|s| s.to_bytes())
                .unwrap_or_default(),
            not_after: params.not_after,
        })
    }
}
