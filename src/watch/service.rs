//! `uvmctl watch --service NAME` on Windows: the watcher run by the
//! service control manager, as systemd runs it on Linux. A stop or a
//! shutdown stops it cleanly (as SIGTERM does, a second one at once); a
//! `paramchange` control (`sc.exe control NAME paramchange`) asks for a
//! fetch and a reconcile now (as SIGHUP does).

use super::signals::Signal;
use std::ffi::OsString;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use windows_service::service::{
    ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::{define_windows_service, service_dispatcher};

/// How long the manager has to call the service's main function once the
/// dispatcher runs.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the watcher cannot run as a service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Not started by the service control manager, or refused by it.
    #[error(
        "cannot run as service {name}: {why} (--service is for the service control manager; from a console, leave it out)"
    )]
    Dispatcher {
        /// The service's name.
        name: String,
        /// What the manager said.
        why: String,
    },
    /// One process runs one service.
    #[error("already running as a service")]
    Already,
}

/// What the service's main function needs, set once before the dispatcher
/// starts (the manager calls it with nothing of ours).
struct Context {
    name: String,
    tx: UnboundedSender<Signal>,
    fetch_first: Option<Arc<Notify>>,
    started: mpsc::Sender<Result<(), String>>,
    done: Mutex<Option<mpsc::Receiver<u32>>>,
}

static CONTEXT: OnceLock<Context> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// The watcher running as a service; [`Service::stop`] tells the manager
/// it stopped; dropped without it (an early error), it stopped failing.
pub struct Service {
    done: Option<mpsc::Sender<u32>>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
}

/// Connects to the service control manager as service `name`, whose
/// stop and paramchange controls become `tx`'s signals (a paramchange
/// notifies `fetch_first` instead, when there is a git source).
///
/// # Errors
/// When not started by the manager, or it refuses.
pub fn start(
    name: &str,
    tx: UnboundedSender<Signal>,
    fetch_first: Option<Arc<Notify>>,
) -> Result<Service, ServiceError> {
    let (started_tx, started_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let failed = started_tx.clone();
    CONTEXT
        .set(Context {
            name: name.to_string(),
            tx,
            fetch_first,
            started: started_tx,
            done: Mutex::new(Some(done_rx)),
        })
        .map_err(|_| ServiceError::Already)?;
    let dispatched = name.to_string();
    // The dispatcher holds its thread until the service stops.
    let dispatcher = std::thread::spawn(move || {
        if let Err(e) = service_dispatcher::start(&dispatched, ffi_service_main) {
            let _ = failed.send(Err(e.to_string()));
        }
    });
    let why = match started_rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(())) => {
            return Ok(Service {
                done: Some(done_tx),
                dispatcher: Some(dispatcher),
            });
        }
        Ok(Err(why)) => why,
        Err(_) => format!(
            "the manager did not start it within {} s",
            START_TIMEOUT.as_secs()
        ),
    };
    Err(ServiceError::Dispatcher {
        name: name.to_string(),
        why,
    })
}

impl Service {
    /// Tells the manager the service stopped, with `code` (0: cleanly).
    pub fn stop(mut self, code: u32) {
        self.finish(code);
    }

    fn finish(&mut self, code: u32) {
        if let Some(done) = self.done.take() {
            let _ = done.send(code);
        }
        if let Some(thread) = self.dispatcher.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.finish(1);
    }
}

fn status(state: ServiceState, code: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP
                | ServiceControlAccept::SHUTDOWN
                | ServiceControlAccept::PARAM_CHANGE
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: if code == 0 {
            ServiceExitCode::Win32(0)
        } else {
            ServiceExitCode::ServiceSpecific(code)
        },
        checkpoint: 0,
        wait_hint: Duration::ZERO,
        process_id: None,
    }
}

/// What a control asks of the watcher.
fn on_control(
    control: ServiceControl,
    tx: &UnboundedSender<Signal>,
    fetch_first: Option<&Notify>,
) -> ServiceControlHandlerResult {
    match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            let _ = tx.send(Signal::Stop);
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::ParamChange => {
            match fetch_first {
                Some(fetch) => fetch.notify_one(),
                None => {
                    let _ = tx.send(Signal::Reconcile);
                }
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    }
}

fn service_main(_arguments: Vec<OsString>) {
    let Some(ctx) = CONTEXT.get() else {
        return;
    };
    let tx = ctx.tx.clone();
    let fetch_first = ctx.fetch_first.clone();
    let handler = move |control| on_control(control, &tx, fetch_first.as_deref());
    let handle = match service_control_handler::register(&ctx.name, handler) {
        Ok(h) => h,
        Err(e) => {
            let _ = ctx.started.send(Err(e.to_string()));
            return;
        }
    };
    if let Err(e) = handle.set_service_status(status(ServiceState::Running, 0)) {
        let _ = ctx.started.send(Err(e.to_string()));
        return;
    }
    let _ = ctx.started.send(Ok(()));
    let done = ctx.done.lock().ok().and_then(|mut d| d.take());
    let code = done.and_then(|d| d.recv().ok()).unwrap_or(0);
    let _ = handle.set_service_status(status(ServiceState::Stopped, code));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_stops_and_a_paramchange_asks_for_a_fetch_or_a_reconcile() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let fetch = Notify::new();
        for c in [ServiceControl::Stop, ServiceControl::Shutdown] {
            assert!(matches!(
                on_control(c, &tx, None),
                ServiceControlHandlerResult::NoError
            ));
            assert!(matches!(rx.try_recv(), Ok(Signal::Stop)));
        }
        on_control(ServiceControl::ParamChange, &tx, None);
        assert!(matches!(rx.try_recv(), Ok(Signal::Reconcile)));
        on_control(ServiceControl::ParamChange, &tx, Some(&fetch));
        assert!(rx.try_recv().is_err(), "a git source fetches first");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), fetch.notified())
                .await
                .expect("the fetch was asked for");
        });
        assert!(matches!(
            on_control(ServiceControl::Pause, &tx, None),
            ServiceControlHandlerResult::NotImplemented
        ));
    }

    #[test]
    fn outside_the_service_manager_it_says_so() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let err = start("uvmctl-test", tx, None)
            .err()
            .expect("no manager started this");
        assert!(
            err.to_string()
                .contains("--service is for the service control manager"),
            "{err}"
        );
    }
}
