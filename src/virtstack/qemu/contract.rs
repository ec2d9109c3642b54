//! The virtstack contract on top of [`Qemu`] and its [`Machine`]s (unix
//! only, as the whole of QEMU's side: `super` gates it).

use super::*;
use crate::spec::{PowerState, VmConfig};
use crate::vm::config::Probe;
use crate::vm::health::{Answer, ProbeCursor};
use crate::vm::history::History;
use crate::vm::{Capabilities, Change, Observe, ObservedVm, Virtstack, VmError, VmName, VmStats};
use async_trait::async_trait;

type Result<T, E = VmError> = std::result::Result<T, E>;

#[async_trait]
impl Observe for Qemu {
    fn name(&self) -> &str {
        crate::vm::QEMU
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>, VmError> {
        // Reading a directory is quick, but a state dir on a stalled mount is not.
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || records.listed())
            .await
            .map_err(|e| VmError::Backend(Box::new(e)))?
            .map_err(|e| VmError::Backend(Box::new(e)))
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm, VmError> {
        Ok(self.vm(name).observe().await?)
    }
}

/// Runs a lifecycle verb with no standing observation of the VM before
/// or after it (the VM is not what was last seen).
async fn lifecycle<T>(
    vm: &Machine<'_>,
    verb: impl std::future::Future<Output = std::result::Result<T, QemuError>>,
) -> Result<T, VmError> {
    vm.unsee();
    let done = verb.await;
    vm.unsee();
    Ok(done?)
}

#[async_trait]
impl Virtstack for Qemu {
    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.resolve(name, config).map(drop).map_err(|source| {
            QemuError::Launch {
                vm: name.to_string(),
                source,
            }
            .into()
        })
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        Ok(self.vm(name).create(&config).await?)
    }

    async fn change(&self, name: &VmName, change: &Change) -> Result<()> {
        let vm = self.vm(name);
        match vm.change(change).await {
            Ok(()) => {
                vm.seen_changed(change);
                Ok(())
            }
            Err(e) => {
                // Whatever part of it happened, the next plan observes.
                vm.unsee();
                Err(e)
            }
        }
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, async { vm.set_config(config) }).await
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, async {
            if paused {
                vm.start_paused().await
            } else {
                vm.start().await
            }
        })
        .await
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.stop()).await
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.pause()).await
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.resume()).await
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.save()).await
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        let done = lifecycle(&vm, vm.destroy()).await;
        if done.is_ok() {
            // Nothing of it is left to keep (a failed destroy keeps what
            // follows the VM, which may still run).
            self.drop_slot(name);
        }
        done
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(self.vm(name).guest_ready().await?)
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        Ok(self.vm(name).stats().await?)
    }

    async fn probe(
        &self,
        name: &VmName,
        probe: &Probe,
        cursor: &mut ProbeCursor,
    ) -> Result<Answer> {
        Ok(self.vm(name).probe(probe, cursor).await?)
    }

    async fn history(&self, name: &VmName) -> Result<History> {
        Ok(self.vm(name).record()?.history)
    }

    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()> {
        let vm = self.vm(name);
        let mut rec = vm.record()?;
        rec.history = history.clone();
        Ok(vm.update_record(&rec)?)
    }

    async fn wait(&self, name: &VmName, timeout: Option<std::time::Duration>) -> Result<bool> {
        Ok(self.vm(name).wait(timeout).await?)
    }

    async fn events(&self, name: &VmName) -> Result<Option<crate::vm::VmEvents>> {
        Ok(self.vm(name).events().await?)
    }

    async fn release(&self, name: &VmName) {
        if let Some(vm) = self.vm_if_kept(name) {
            vm.forget();
        }
    }
}
