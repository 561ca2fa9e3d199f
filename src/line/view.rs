//! The live view of a line: one line per port (port, device serial, step,
//! pass or fail), drawn with indicatif on a terminal only.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::session::{Observer, Step};

/// Whether the live view is drawn: stderr is a terminal, no `--json`, no `-q`.
pub fn wanted(json: bool, quiet: bool) -> bool {
    !json && !quiet && std::io::stderr().is_terminal()
}

/// One spinner per port under a [`MultiProgress`].
pub struct LiveView {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl std::fmt::Debug for LiveView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveView").finish_non_exhaustive()
    }
}

impl Default for LiveView {
    fn default() -> Self {
        LiveView::new()
    }
}

impl LiveView {
    /// A view drawing on stderr.
    pub fn new() -> LiveView {
        LiveView {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, port: &str) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.entry(port.to_string())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} [{elapsed:>4}] {prefix:<24} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(port.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .clone()
    }

    /// The session on `port` ended: pass, or fail with the reason.
    pub fn finish(&self, port: &str, serial: Option<&str>, outcome: Result<(), &str>) {
        let bar = self.bar(port);
        let serial = serial.unwrap_or("-");
        match outcome {
            Ok(()) => bar.finish_with_message(format!("{serial:<16} PASS")),
            Err(reason) => bar.finish_with_message(format!("{serial:<16} FAIL {reason}")),
        }
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }
}

impl Observer for LiveView {
    fn step(&self, port: &str, serial: Option<&str>, step: Step) {
        self.bar(port)
            .set_message(format!("{:<16} {step}", serial.unwrap_or("-")));
    }
}
