//! WAL checkpoints off the writer's thread.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses its
//! threshold, on the writing connection: the writer then copies pages into
//! the database file (and syncs it) while every worker waits on it. Here
//! the writer's automatic checkpoint is off and this thread, with its own
//! connection, runs a PASSIVE checkpoint whenever the WAL has grown, so the
//! copying overlaps with the writer's next transactions. PASSIVE never
//! blocks the writer; a checkpoint that cannot finish (a reader still on
//! old pages) simply goes on at the next round.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, OpenFlags};

use super::error::LedgerError;

/// How often the WAL is looked at.
const PERIOD: Duration = Duration::from_millis(50);

/// The checkpointing thread; stops (after a last checkpoint) when dropped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the ledger at `path`.
    pub(crate) fn start(path: &Path) -> Result<Checkpointer, LedgerError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let sqlite = |op: &str| {
            let op = op.to_string();
            let path = path.to_path_buf();
            move |source| LedgerError::Sqlite { path, op, source }
        };
        let conn =
            Connection::open_with_flags(path, flags).map_err(sqlite("opening for checkpoints"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sqlite("setting the busy timeout"))?;
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let owned: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || run(&conn, &owned, &stopped))
            .map_err(|e| LedgerError::Invalid {
                path: path.to_path_buf(),
                op: "starting the checkpoint thread".into(),
                problem: e.to_string(),
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

fn run(conn: &Connection, path: &Path, stopped: &Receiver<()>) {
    let mut last_frames = 0i64;
    loop {
        let stopping = !matches!(stopped.recv_timeout(PERIOD), Err(RecvTimeoutError::Timeout));
        // (busy, frames in the WAL, frames checkpointed)
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        match result {
            Ok((_, frames, done)) => {
                if frames != last_frames || done < frames {
                    tracing::trace!(ledger = %path.display(), frames, done, "checkpoint");
                }
                last_frames = frames;
            }
            // The writer reports what matters about the file; a checkpoint
            // that failed is tried again at the next round.
            Err(e) => tracing::debug!(ledger = %path.display(), error = %e, "checkpoint failed"),
        }
        if stopping {
            return;
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
