//! The reporter thread: symbolizes each snapshot's stacks, renders the report and writes it.
//! It owns the blazesym symbolizer (not `Send`) and its caches, off the event path.

use std::{
    io,
    sync::{Arc, mpsc},
    thread,
};

use super::{
    output::{Failure, Output},
    render::{Format, Header, Report, Style, json},
    snapshot::Snapshot,
};
use crate::{
    metrics::{Exporter, exporter::Watch},
    model::location::Location,
    stacks::{python::PyNames, symbolize::StackSymbolizer},
    target::modules::Modules,
};

enum Message {
    /// Boxed: a snapshot is a few hundred bytes, the other message none.
    Snapshot(Box<Snapshot>),
    /// Everything is queued: write what is and end.
    Finish,
}

pub struct Reporter {
    tx: mpsc::Sender<Message>,
    handle: thread::JoinHandle<Result<(), Failure>>,
}

impl Reporter {
    /// `modules` are those the snapshots' stacks are located in, `python` names their Python
    /// frames.
    pub fn spawn(
        header: Header,
        modules: Arc<Modules>,
        python: Arc<PyNames>,
        format: Format,
        style: Style,
        mut out: Output,
        exporter: Option<Arc<Exporter>>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Message>();
        let handle = thread::Builder::new()
            .name("reporter".into())
            .spawn(move || {
                let mut symbolizer = StackSymbolizer::new(modules, python);
                let mut watch = exporter.map(Watch::new);
                for message in rx {
                    let snapshot = match message {
                        Message::Snapshot(snapshot) => *snapshot,
                        Message::Finish => break,
                    };
                    if let Some(watch) = &mut watch {
                        watch.report(&header, &snapshot, &mut symbolizer);
                    }
                    if !out.wants(snapshot.last) {
                        continue;
                    }
                    let stacks: Vec<&[Location]> =
                        snapshot.stacks.iter().map(|s| &*s.frames).collect();
                    let frames = symbolizer.symbolize_stacks(&stacks);
                    let report = Report {
                        header: &header,
                        snapshot: &snapshot,
                        frames: &frames,
                        style,
                    };
                    let written = if format == Format::Json {
                        // Written as it is rendered: it lists every frame of every stack,
                        // hundreds of MB for 100,000 stacks.
                        out.write_with(snapshot.timestamp_ms, &mut |w| json::write(&report, w))
                    } else {
                        // A fresh buffer each time: one kept would hold the largest report's
                        // size for the rest of the trace.
                        let mut rendered = Vec::new();
                        format.render(&report, &mut rendered).map_err(|err| {
                            Failure::WriteFailed(format!("rendering the report: {err}"))
                        })?;
                        out.write(&rendered, snapshot.timestamp_ms)
                    };
                    // The trace learns of a failure from the output and stops; reports
                    // queued meanwhile have nowhere to go. A reader that went away (`| head`)
                    // is not an error.
                    match written {
                        Err(Failure::ReaderGone) => return Ok(()),
                        other => other?,
                    }
                }
                Ok(())
            })?;
        Ok(Self { tx, handle })
    }

    /// Queues a snapshot; never blocks the event path.
    pub fn send(&self, snapshot: Snapshot) {
        // The thread only ends early when its output failed; then there is nowhere to report.
        let _ = self.tx.send(Message::Snapshot(Box::new(snapshot)));
    }

    /// Waits until every queued report is written.
    pub fn finish(self) -> Result<(), Failure> {
        let _ = self.tx.send(Message::Finish);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(Failure::WriteFailed("the reporter thread panicked".into())))
    }
}
