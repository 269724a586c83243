//! Per-destination lanes: the isolation every outbound queue uses (federation transactions,
//! invites, registration actions, the bot's joins). Synapse's federation sender is the
//! model: each destination has its own task with at most one request in flight, its own
//! exponential backoff after failures, and is woken early when that server contacts
//! fedlink. A dead or hanging destination therefore delays only its own lane.
//!
//! A lane runs the owner's `work(destination)` step function until a step reports there is
//! nothing more to do; then its task ends. [`Lanes::kick`] starts the task (or marks the
//! running one dirty, so it looks again before ending). A step that fails backs the whole
//! destination off; the owner decides what a failure is (a refused item is not one).

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::{node::now_ms, core::backoff::Backoff, metrics::Metrics};

/// What one step of a lane's work came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The destination answered; `delivered` items went through; `more` when work remains.
    Done {
        /// Items delivered in this step.
        delivered: u64,
        /// Whether the lane should step again at once.
        more: bool,
    },
    /// The destination failed (network, timeout, 429, 5xx): back the lane off.
    Failed(String),
}

/// Delivery state of one destination, for the admin API.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LaneStatus {
    /// Consecutive failed steps.
    pub failures: u32,
    /// When the next attempt is due (ms since the epoch; 0: now).
    pub next_attempt_ms: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// Last step that reached the destination (ms since the epoch).
    pub last_success_ms: Option<u64>,
    /// Items delivered since start.
    pub delivered: u64,
    /// Whether a task is working on this lane now.
    pub running: bool,
}

#[derive(Default)]
struct Lane {
    status: LaneStatus,
    dirty: bool,
    wake: Arc<Notify>,
}

/// A set of lanes, one per destination, for one kind of queue.
pub struct Lanes {
    queue: &'static str,
    backoff: Backoff,
    lanes: Mutex<HashMap<String, Lane>>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
}

impl Lanes {
    /// Lanes for the queue named `queue` (a metric label), with `backoff` between failures.
    pub fn new(queue: &'static str, backoff: Backoff, metrics: Arc<Metrics>, stop: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self { queue, backoff, lanes: Mutex::new(HashMap::new()), metrics, stop })
    }

    /// Make sure `dest`'s lane works through what is queued for it: start its task with
    /// `work` if none runs, else have the running one look again before it ends.
    pub fn kick<F, Fut>(self: &Arc<Self>, dest: &str, work: F)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Step> + Send + 'static,
    {
        {
            let mut lanes = self.lanes.lock().expect("lanes lock");
            let lane = lanes.entry(dest.to_owned()).or_default();
            if lane.status.running {
                lane.dirty = true;
                return;
            }
            lane.status.running = true;
            lane.dirty = false;
        }
        let this = self.clone();
        let dest = dest.to_owned();
        tokio::spawn(async move { this.run(dest, work).await });
    }

    /// [`Lanes::kick`] with a step that needs a shared context (the node): each step gets
    /// its own handle on `ctx` and the destination.
    pub fn kick_for<C, F, Fut>(self: &Arc<Self>, dest: &str, ctx: &Arc<C>, step: F)
    where
        C: Send + Sync + 'static,
        F: Fn(Arc<C>, String) -> Fut + Send + Sync + Copy + 'static,
        Fut: Future<Output = Step> + Send + 'static,
    {
        let ctx = ctx.clone();
        self.kick(dest, move |d| step(ctx.clone(), d));
    }

    /// `dest` contacted fedlink: it is up. Reset its backoff and wake its lane, as Synapse
    /// does when a backed-off destination sends it something.
    pub fn contact(&self, dest: &str) {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if let Some(lane) = lanes.get_mut(dest).filter(|l| l.status.failures > 0) {
            lane.status.failures = 0;
            lane.status.next_attempt_ms = 0;
            lane.wake.notify_one();
            self.metrics.destination_wakeups.with_label_values(&[self.queue]).inc();
            tracing::info!(queue = self.queue, %dest, "destination contacted us; retrying it now");
            self.update_gauge(&lanes);
        }
    }

    /// When `dest` may be tried next (ms since the epoch; 0 when not backing off).
    pub fn next_attempt(&self, dest: &str) -> u64 {
        self.lanes.lock().expect("lanes lock").get(dest).map(|l| l.status.next_attempt_ms).unwrap_or(0)
    }

    /// Every lane's status, by destination.
    pub fn report(&self) -> BTreeMap<String, LaneStatus> {
        self.lanes.lock().expect("lanes lock").iter().map(|(d, l)| (d.clone(), l.status.clone())).collect()
    }

    fn update_gauge(&self, lanes: &HashMap<String, Lane>) {
        let n = lanes.values().filter(|l| l.status.failures > 0).count();
        self.metrics.destinations_backing_off.with_label_values(&[self.queue]).set(n as i64);
    }

    async fn run<F, Fut>(self: Arc<Self>, dest: String, work: F)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Step> + Send + 'static,
    {
        let mut stop = self.stop.clone();
        loop {
            if *stop.borrow() {
                return self.end(&dest);
            }
            let (due, wake) = {
                let lanes = self.lanes.lock().expect("lanes lock");
                let lane = lanes.get(&dest).expect("a running lane exists");
                (lane.status.next_attempt_ms, lane.wake.clone())
            };
            let now = now_ms();
            if due > now {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(due - now)) => {}
                    _ = wake.notified() => {}
                    _ = stop.wait_for(|s| *s) => return self.end(&dest),
                }
                continue;
            }
            if let Some(lane) = self.lanes.lock().expect("lanes lock").get_mut(&dest) {
                lane.dirty = false;
            }
            let step = tokio::select! {
                s = work(dest.clone()) => s,
                _ = stop.wait_for(|s| *s) => return self.end(&dest),
            };
            let mut lanes = self.lanes.lock().expect("lanes lock");
            let lane = lanes.get_mut(&dest).expect("a running lane exists");
            match step {
                Step::Done { delivered, more } => {
                    let recovered = lane.status.failures > 0;
                    lane.status.failures = 0;
                    lane.status.next_attempt_ms = 0;
                    lane.status.last_success_ms = Some(now_ms());
                    lane.status.delivered += delivered;
                    if recovered {
                        tracing::info!(queue = self.queue, %dest, "destination reachable again");
                        self.update_gauge(&lanes);
                    }
                    let lane = lanes.get_mut(&dest).expect("a running lane exists");
                    if !more && !lane.dirty {
                        lane.status.running = false;
                        return;
                    }
                }
                Step::Failed(error) => {
                    lane.status.failures += 1;
                    lane.status.next_attempt_ms = now_ms() + self.backoff.delay(lane.status.failures).as_millis() as u64;
                    tracing::warn!(queue = self.queue, %dest, failures = lane.status.failures, %error, "destination failed; backing off");
                    lane.status.last_error = Some(error);
                    self.update_gauge(&lanes);
                }
            }
        }
    }

    fn end(&self, dest: &str) {
        if let Some(lane) = self.lanes.lock().expect("lanes lock").get_mut(dest) {
            lane.status.running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn lanes() -> (Arc<Lanes>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        let b = Backoff { base: Duration::from_secs(3600), max: Duration::from_secs(3600) };
        (Lanes::new("test", b, Arc::new(Metrics::new()), rx), tx)
    }

    async fn wait(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Given a destination that hangs, when another destination has work, then the other
    /// is served at once, and the hanging one's lane stays busy on its own.
    #[tokio::test]
    async fn a_hanging_destination_does_not_delay_another() {
        let (l, _stop) = lanes();
        let served = Arc::new(AtomicU32::new(0));
        l.kick("dead", |_| async {
            std::future::pending::<()>().await;
            Step::Done { delivered: 0, more: false }
        });
        let s = served.clone();
        l.kick("alive", move |_| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                Step::Done { delivered: 1, more: false }
            }
        });
        wait("alive served", || served.load(Ordering::SeqCst) == 1).await;
        wait("alive idle", || !l.report()["alive"].running).await;
        assert!(l.report()["dead"].running);
        assert_eq!(l.report()["alive"].delivered, 1);
    }

    /// Given a failed destination backing off for an hour, when it contacts us, then it is
    /// retried at once and its backoff is cleared.
    #[tokio::test]
    async fn a_failed_destination_backs_off_until_it_contacts_us() {
        let (l, _stop) = lanes();
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        l.kick("kiwi", move |_| {
            let t = t.clone();
            async move {
                match t.fetch_add(1, Ordering::SeqCst) {
                    0 => Step::Failed("connection refused".into()),
                    _ => Step::Done { delivered: 1, more: false },
                }
            }
        });
        wait("first failure", || l.report()["kiwi"].failures == 1).await;
        assert!(l.next_attempt("kiwi") > now_ms() + 3_000_000);
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        l.contact("kiwi");
        wait("retried", || tries.load(Ordering::SeqCst) == 2 && !l.report()["kiwi"].running).await;
        assert_eq!(l.report()["kiwi"].failures, 0);
        assert_eq!(l.report()["kiwi"].delivered, 1);
    }

    /// Given a lane in the middle of a step, when it is kicked again, then it steps once more
    /// before it ends (no work is left behind by the race between kick and ending).
    #[tokio::test]
    async fn a_kick_during_a_step_is_not_lost() {
        let (l, _stop) = lanes();
        let steps = Arc::new(AtomicU32::new(0));
        let gate = Arc::new(Notify::new());
        let (s, g) = (steps.clone(), gate.clone());
        let work = move |_: String| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                if s.fetch_add(1, Ordering::SeqCst) == 0 {
                    g.notified().await;
                }
                Step::Done { delivered: 0, more: false }
            }
        };
        l.kick("kiwi", work.clone());
        wait("first step started", || steps.load(Ordering::SeqCst) == 1).await;
        l.kick("kiwi", work);
        gate.notify_one();
        wait("second step", || steps.load(Ordering::SeqCst) == 2).await;
        wait("idle", || !l.report()["kiwi"].running).await;
    }
}
