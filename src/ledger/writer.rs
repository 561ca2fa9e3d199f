//! Group commit: one thread owns the writing connection and commits many
//! operations per transaction.
//!
//! ```text
//! callers ──(bounded channel)──> writer: BEGIN; op; op; ... COMMIT ──> each caller's answer
//! ```
//!
//! Each operation runs inside its own savepoint, so one refused operation
//! (a duplicate serial, a wrong transition) is rolled back alone and the
//! others of the batch commit. Answers go out only after COMMIT returned.
//! When the batch cannot commit (a full disk, an I/O error), it is rolled
//! back and every operation is tried again in a transaction of its own, so
//! each caller gets the error of its own operation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rusqlite::Connection;

use super::error::LedgerError;
use super::lifecycle::{self, WriteOp};
use super::store::{self, CaKey, Ctx, PlanOp};
use super::types::PlanOutcome;
use crate::clock::Clock;

/// An operation waiting for its transaction, with where its answer goes.
pub(crate) enum Request {
    Plan {
        op: PlanOp,
        reply: Sender<Result<PlanOutcome, LedgerError>>,
        result: Option<Result<PlanOutcome, LedgerError>>,
    },
    Write {
        op: WriteOp,
        reply: Sender<Result<(), LedgerError>>,
        result: Option<Result<(), LedgerError>>,
    },
}

impl Request {
    fn describe(&self) -> String {
        match self {
            Request::Plan { op, .. } => op.describe(),
            Request::Write { op, .. } => op.describe(),
        }
    }

    /// Runs the operation; whether it succeeded.
    fn apply(&mut self, conn: &Connection, ctx: &Ctx<'_>) -> bool {
        match self {
            Request::Plan { op, result, .. } => result.insert(store::plan(conn, ctx, op)).is_ok(),
            Request::Write { op, result, .. } => {
                result.insert(lifecycle::write(conn, ctx, op)).is_ok()
            }
        }
    }

    /// Replaces the result by `err` (the transaction did not commit).
    fn fail(&mut self, err: LedgerError) {
        match self {
            Request::Plan { result, .. } => *result = Some(Err(err)),
            Request::Write { result, .. } => *result = Some(Err(err)),
        }
    }

    /// Sends the answer; a caller that stopped waiting is no concern.
    fn answer(self) {
        match self {
            Request::Plan {
                reply,
                result: Some(r),
                ..
            } => {
                let _ = reply.send(r);
            }
            Request::Write {
                reply,
                result: Some(r),
                ..
            } => {
                let _ = reply.send(r);
            }
            // Never applied: dropping the reply tells the caller.
            _ => {}
        }
    }
}

/// How the writer batches.
#[derive(Debug, Clone)]
pub(crate) struct Batching {
    pub max_batch: usize,
    pub linger: Duration,
}

/// The thread that owns the writing connection.
pub(crate) struct Writer {
    pub conn: Connection,
    pub path: PathBuf,
    pub ca: CaKey,
    pub clock: Arc<dyn Clock>,
    pub batching: Batching,
}

impl Writer {
    /// Serves requests until every sender is gone.
    pub(crate) fn run(mut self, rx: Receiver<Request>) {
        let max = self.batching.max_batch.max(1);
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::with_capacity(max.min(1024));
            batch.push(first);
            let deadline = Instant::now() + self.batching.linger;
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) if self.batching.linger.is_zero() => break,
                    Err(TryRecvError::Empty) => match rx.recv_deadline(deadline) {
                        Ok(req) => batch.push(req),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    },
                }
            }
            self.commit(&mut batch);
            for req in batch {
                req.answer();
            }
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            path: &self.path,
            ca: self.ca,
            now: super::timestamp(self.clock.now()),
        }
    }

    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.execute_batch(sql)
    }

    fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.exec("ROLLBACK");
        }
    }

    /// Applies and commits `batch`, leaving each request's result in place.
    ///
    /// First without savepoints: a savepoint copies every page an operation
    /// touches into its journal, which costs more than the operation, and
    /// refusals are rare. If any operation is refused, that attempt is rolled
    /// back and the batch runs again with one savepoint per operation, so
    /// the refused one rolls back alone.
    fn commit(&mut self, batch: &mut [Request]) {
        if batch.len() > 1
            && (self.commit_together(batch, false) || self.commit_together(batch, true))
        {
            return;
        }
        for req in batch.iter_mut() {
            self.commit_alone(req);
        }
    }

    /// One transaction for the whole batch; false if it did not commit.
    /// Without `savepoints`, a refused operation makes it give up.
    fn commit_together(&self, batch: &mut [Request], savepoints: bool) -> bool {
        if self.exec("BEGIN IMMEDIATE").is_err() {
            return false;
        }
        let ctx = self.ctx();
        for req in batch.iter_mut() {
            if savepoints && self.exec("SAVEPOINT op").is_err() {
                self.rollback();
                return false;
            }
            let ok = req.apply(&self.conn, &ctx);
            // SQLite rolls the whole transaction back on some errors
            // (SQLITE_FULL, SQLITE_IOERR, ...): then the batch is lost.
            if self.conn.is_autocommit() {
                return false;
            }
            if !savepoints {
                if !ok {
                    self.rollback();
                    return false;
                }
                continue;
            }
            let end = if ok {
                "RELEASE op"
            } else {
                "ROLLBACK TO op; RELEASE op"
            };
            if self.exec(end).is_err() {
                self.rollback();
                return false;
            }
        }
        if self.exec("COMMIT").is_err() {
            self.rollback();
            return false;
        }
        true
    }

    /// One transaction for one request.
    fn commit_alone(&self, req: &mut Request) {
        if let Err(source) = self.exec("BEGIN IMMEDIATE") {
            req.fail(self.sqlite(req, source));
            return;
        }
        if !req.apply(&self.conn, &self.ctx()) {
            self.rollback();
            return;
        }
        if let Err(source) = self.exec("COMMIT") {
            self.rollback();
            req.fail(self.sqlite(req, source));
        }
    }

    fn sqlite(&self, req: &Request, source: rusqlite::Error) -> LedgerError {
        LedgerError::Sqlite {
            path: self.path.clone(),
            op: format!("committing ({})", req.describe()),
            source,
        }
    }
}
