//! The edge of the line: a byte pipe to one device.
//!
//! The session only needs to write bytes, read what arrived within a time
//! limit, and name the port in its errors. [`SerialTransport`] is the real
//! port (a serial or USB CDC-ACM device, or a pseudo-terminal).

use std::io;
use std::time::Duration;

/// A byte pipe to one device.
pub trait Transport: Send {
    /// The port's name (its path), for reports and errors.
    fn name(&self) -> &str;

    /// Writes every byte of `bytes` and flushes them towards the device.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Reads what has arrived into `buf`, waiting at most `timeout` for the
    /// first byte. `Ok(0)` means nothing came in time.
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
}

/// A serial port (or USB CDC-ACM port, or pseudo-terminal) opened with
/// serialport: 8N1, no flow control, exclusive on Unix.
pub struct SerialTransport {
    name: String,
    port: Box<dyn serialport::SerialPort>,
    timeout: Duration,
}

impl std::fmt::Debug for SerialTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialTransport")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SerialTransport {
    /// Opens `path` at `baud` (0: the port's own rate, as over USB).
    pub fn open(path: &str, baud: u32) -> Result<SerialTransport, serialport::Error> {
        let timeout = Duration::from_millis(100);
        let port = serialport::new(path, if baud == 0 { 115_200 } else { baud })
            .data_bits(serialport::DataBits::Eight)
            .parity(serialport::Parity::None)
            .stop_bits(serialport::StopBits::One)
            .flow_control(serialport::FlowControl::None)
            .timeout(timeout)
            .open()?;
        Ok(SerialTransport {
            name: path.to_string(),
            port,
            timeout,
        })
    }
}

impl Transport for SerialTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        io::Write::write_all(&mut self.port, bytes)?;
        io::Write::flush(&mut self.port)
    }

    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let timeout = timeout.max(Duration::from_millis(1));
        if timeout != self.timeout {
            self.port.set_timeout(timeout).map_err(io::Error::from)?;
            self.timeout = timeout;
        }
        match io::Read::read(&mut self.port, buf) {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}
