//! The job CSV: one row per device, each checked and numbered.
//!
//! Header required; `serial` required and unique; optional `thing_name`
//! (default from a pattern such as `sensor_{serial}`), `thing_type`,
//! `groups` (`;`-separated), `key`, `csr` (path relative to the CSV's
//! folder); every other column is a thing attribute. A bad row becomes a
//! [`RowError`] naming its line; it never stops the rows around it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::keygen::KeyType;

/// Columns with a meaning of their own; all others are attributes.
pub const KNOWN_COLUMNS: [&str; 6] = ["serial", "thing_name", "thing_type", "groups", "key", "csr"];
/// The default thing-name pattern.
pub const DEFAULT_PATTERN: &str = "sensor_{serial}";

/// How rows become devices.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Thing name when the row gives none; `{column}` is replaced by that column's value.
    pub thing_name_pattern: String,
    /// Key type when the row gives none.
    pub default_key: KeyType,
    /// Refuse repeated serials and thing names while reading. This keeps
    /// every serial in memory; a pipeline with a ledger leaves it to the
    /// ledger and reads a job of any size in constant memory.
    pub track_duplicates: bool,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            thing_name_pattern: DEFAULT_PATTERN.into(),
            default_key: KeyType::P256,
            track_duplicates: true,
        }
    }
}

/// Where a device's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The station generates a key of this type.
    Station(KeyType),
    /// The device made its key; this file holds its CSR.
    Csr(PathBuf),
}

/// One device of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    /// Line in the CSV (header is line 1).
    pub line: u64,
    /// The device serial.
    pub serial: String,
    /// The AWS IoT thing name (certificate CN).
    pub thing_name: String,
    /// Thing type, if any.
    pub thing_type: Option<String>,
    /// Thing groups.
    pub groups: Vec<String>,
    /// Where the key comes from.
    pub key: KeySource,
    /// Thing attributes: every column not in [`KNOWN_COLUMNS`], when not empty.
    pub attributes: BTreeMap<String, String>,
}

/// A row that cannot become a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct RowError {
    /// Line in the CSV.
    pub line: u64,
    /// The row's serial, when it has one.
    pub serial: String,
    /// The row's thing name, when known.
    pub thing_name: String,
    /// What is wrong.
    pub problem: String,
}

/// A job that cannot be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The file cannot be opened.
    #[error("{path}: {source}")]
    Io {
        /// The job file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The header is missing or unreadable.
    #[error("{path}: line 1: {reason}")]
    Header {
        /// The job file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The thing-name pattern names a column the job lacks.
    #[error("thing-name pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads a job CSV row by row.
pub struct JobReader {
    path: PathBuf,
    base_dir: PathBuf,
    reader: csv::Reader<File>,
    header: Vec<String>,
    config: JobConfig,
    seen_serials: HashMap<String, u64>,
    seen_names: HashMap<String, u64>,
    record: csv::StringRecord,
}

impl std::fmt::Debug for JobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobReader")
            .field("path", &self.path)
            .finish()
    }
}

impl JobReader {
    /// Opens a job and checks its header and the thing-name pattern.
    pub fn open(path: &Path, config: JobConfig) -> Result<Self, JobError> {
        let file = File::open(path).map_err(|source| JobError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(file);
        let header_err = |reason: String| JobError::Header {
            path: path.to_path_buf(),
            reason,
        };
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| header_err(e.to_string()))?
            .iter()
            .map(|h| h.trim_start_matches('\u{feff}').to_ascii_lowercase())
            .collect();
        if !header.iter().any(|h| h == "serial") {
            return Err(header_err(format!(
                "no \"serial\" column (header: {})",
                header.join(",")
            )));
        }
        for (i, h) in header.iter().enumerate() {
            if h.is_empty() {
                return Err(header_err(format!("column {} has no name", i + 1)));
            }
            if header[..i].contains(h) {
                return Err(header_err(format!("column {h:?} appears twice")));
            }
        }
        check_pattern(&config.thing_name_pattern, &header)?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(JobReader {
            path: path.to_path_buf(),
            base_dir,
            reader,
            header,
            config,
            seen_serials: HashMap::new(),
            seen_names: HashMap::new(),
            record: csv::StringRecord::new(),
        })
    }

    /// The job file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn row(&mut self, line: u64) -> Result<DeviceRequest, RowError> {
        let record = &self.record;
        let get = |name: &str| {
            self.header
                .iter()
                .position(|h| h == name)
                .and_then(|i| record.get(i))
                .unwrap_or("")
        };
        let serial = get("serial").to_string();
        let mut fail = RowError {
            line,
            serial: serial.clone(),
            thing_name: String::new(),
            problem: String::new(),
        };
        let refuse = |mut fail: RowError, problem: String| {
            fail.problem = problem;
            Err(fail)
        };
        if record.len() != self.header.len() {
            return refuse(
                fail,
                format!(
                    "{} fields, the header has {}",
                    record.len(),
                    self.header.len()
                ),
            );
        }
        if let Err(problem) = check_serial(&serial) {
            return refuse(fail, problem);
        }
        let thing_name = match get("thing_name") {
            "" => expand(&self.config.thing_name_pattern, |col| get(col)),
            name => name.to_string(),
        };
        fail.thing_name = thing_name.clone();
        if let Err(problem) = check_thing_name(&thing_name) {
            return refuse(fail, problem);
        }
        let key = match (get("key"), get("csr")) {
            ("", "") => KeySource::Station(self.config.default_key),
            (key, "") => match key.parse::<KeyType>() {
                Ok(k) => KeySource::Station(k),
                Err(e) => return refuse(fail, e.to_string()),
            },
            ("", csr) => KeySource::Csr(self.base_dir.join(csr)),
            (_, _) => {
                return refuse(
                    fail,
                    "both key and csr given: a CSR carries the device's own key".into(),
                )
            }
        };
        if self.config.track_duplicates {
            if let Some(first) = self.seen_serials.get(&serial) {
                let problem = format!("duplicate serial {serial} (first on line {first})");
                return refuse(fail, problem);
            }
            if let Some(first) = self.seen_names.get(&thing_name) {
                let problem = format!("duplicate thing name {thing_name} (first on line {first})");
                return refuse(fail, problem);
            }
            self.seen_serials.insert(serial.clone(), line);
            self.seen_names.insert(thing_name.clone(), line);
        }
        let attributes = self
            .header
            .iter()
            .zip(record.iter())
            .filter(|(h, v)| !KNOWN_COLUMNS.contains(&h.as_str()) && !v.is_empty())
            .map(|(h, v)| (h.clone(), v.to_string()))
            .collect();
        let thing_type = Some(get("thing_type").to_string()).filter(|t| !t.is_empty());
        let groups = get("groups")
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
        Ok(DeviceRequest {
            line,
            serial,
            thing_name,
            thing_type,
            groups,
            key,
            attributes,
        })
    }
}

impl Iterator for JobReader {
    type Item = Result<DeviceRequest, RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                let line = self.record.position().map_or(0, |p| p.line());
                Some(self.row(line))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                Some(Err(RowError {
                    line,
                    serial: String::new(),
                    thing_name: String::new(),
                    problem: format!("unreadable row: {e}"),
                }))
            }
        }
    }
}

/// A device serial: it becomes the certificate's serialNumber, a
/// PrintableString of at most 64 characters.
pub fn check_serial(serial: &str) -> Result<(), String> {
    if serial.is_empty() {
        return Err("empty serial".into());
    }
    if serial.len() > 64 {
        return Err(format!("serial {serial:?} is longer than 64 characters"));
    }
    let printable = |c: char| c.is_ascii_alphanumeric() || " '()+,-./:=?".contains(c);
    if !serial.chars().all(printable) {
        return Err(format!(
            "serial {serial:?} has characters a certificate serialNumber cannot hold (A-Z a-z 0-9 space '()+,-./:=?)"
        ));
    }
    Ok(())
}

/// An AWS IoT thing name that can also be a certificate CN: 1 to 128
/// characters of `[a-zA-Z0-9:_-]` for AWS, at most 64 for the CN.
pub fn check_thing_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty thing name".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')))
    {
        return Err(format!(
            "thing name {name:?} has {bad:?}; AWS IoT allows only a-z A-Z 0-9 : _ -"
        ));
    }
    if name.len() > 128 {
        return Err(format!(
            "thing name is {} characters; AWS IoT allows at most 128",
            name.len()
        ));
    }
    if name.len() > 64 {
        return Err(format!(
            "thing name is {} characters; as the certificate CN it may have at most 64 (RFC 5280)",
            name.len()
        ));
    }
    Ok(())
}

fn check_pattern(pattern: &str, header: &[String]) -> Result<(), JobError> {
    let err = |reason: String| JobError::Pattern {
        pattern: pattern.to_string(),
        reason,
    };
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| err("unclosed {".into()))?;
        let column = &rest[start + 1..start + end];
        if !header.iter().any(|h| h == column) {
            return Err(err(format!("the job has no column {column:?}")));
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

fn expand<'a>(pattern: &str, column: impl Fn(&str) -> &'a str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        out.push_str(column(&rest[start + 1..start + end]));
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn job(text: &str) -> (tempfile::TempDir, Vec<Result<DeviceRequest, RowError>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.csv");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let rows = JobReader::open(&path, JobConfig::default())
            .unwrap()
            .collect();
        (dir, rows)
    }

    #[test]
    fn rows_get_defaults_attributes_and_line_numbers() {
        let (dir, rows) = job(
            "serial,thing_name,groups,location,csr\nA1,,g1; g2,hall,\nA2,dev-2,,,csrs/a2.csr\n",
        );
        let a1 = rows[0].as_ref().unwrap();
        assert_eq!((a1.line, a1.thing_name.as_str()), (2, "sensor_A1"));
        assert_eq!(a1.groups, ["g1", "g2"]);
        assert_eq!(
            a1.attributes.get("location").map(String::as_str),
            Some("hall")
        );
        let a2 = rows[1].as_ref().unwrap();
        assert_eq!(a2.key, KeySource::Csr(dir.path().join("csrs/a2.csr")));
    }

    #[test]
    fn bad_rows_name_their_line_and_do_not_stop_the_rest() {
        let (_dir, rows) = job("serial,thing_name,key\nA,,\nA,,\n,x,\nB,bad name,\nC,,dsa\nD,,\n");
        let errors: Vec<String> = rows
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("line 3: duplicate serial A (first on line 2)"));
        assert!(errors[1].starts_with("line 4: empty serial"));
        assert!(errors[2].starts_with("line 5: thing name"));
        assert!(errors[3].starts_with("line 6: unknown key type"));
        assert_eq!(rows.last().unwrap().as_ref().unwrap().serial, "D");
    }

    #[test]
    fn thing_names_follow_aws_and_cn_rules() {
        assert!(check_thing_name("sensor_01:a-b").is_ok());
        assert!(check_thing_name(&"a".repeat(65))
            .unwrap_err()
            .contains("64"));
        assert!(check_thing_name(&"a".repeat(129))
            .unwrap_err()
            .contains("128"));
        assert!(check_serial("SN 1/2").is_ok());
        assert!(check_serial("SN_1").is_err());
    }

    #[test]
    fn pattern_must_name_existing_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.csv");
        std::fs::write(&path, "serial\nA\n").unwrap();
        let config = JobConfig {
            thing_name_pattern: "x_{nope}".into(),
            ..JobConfig::default()
        };
        assert!(matches!(
            JobReader::open(&path, config),
            Err(JobError::Pattern { .. })
        ));
    }
}
