//! Job leases as a pass sees them: whether the pass running here still holds its job's lease.
//! `jobs` takes and renews the lease; the passes (reconcile, expiry, webhooks, drift) check it
//! between units of work.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

tokio::task_local! {
    /// Set while a leased pass runs: true once its lease was lost (another replica holds it).
    static LEASE_LOST: Arc<AtomicBool>;
}

/// Whether the pass running here still holds its job's lease (always true outside a leased
/// pass). Passes check it between units of work and stop when it is lost, so they never act
/// after another replica has taken over, and never stop halfway through one unit (a delivery
/// sent but not recorded).
pub fn lease_held() -> bool {
    LEASE_LOST.try_with(|lost| !lost.load(std::sync::atomic::Ordering::SeqCst)).unwrap_or(true)
}

/// Runs `pass` as a leased pass whose lease is lost once `lost` is set.
pub(crate) async fn run_leased<F: Future>(lost: Arc<AtomicBool>, pass: F) -> F::Output {
    LEASE_LOST.scope(lost, pass).await
}
