//! When a training job yields the GPU to inference and when it gets it
//! back: plain code on a millisecond clock, so that the daemon's controller
//! and the tests drive the same decisions.
//!
//! - Inference first (the paper's): a request queued or running stops
//!   training at once; training resumes once no request has been queued or
//!   running for the job's idle time.
//! - Time share (`share` of every `period_ms` to training under load):
//!   training runs at least `share * period` before a waiting request stops
//!   it; inference then has the GPU for at most `(1 - share) * period` while
//!   training waits, after which queued requests are held back (the one
//!   running finishes) and training resumes. Without inference load training
//!   resumes after the idle time, as with inference first.

use pipeswitch::protocol::{SharePolicy, TrainJob};

/// Where the training job is, as the policy needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Training {
    /// Running on its worker.
    Running,
    /// Told to stop; not stopped yet (inference waits for the GPU).
    Stopping,
    /// Stopped; its state saved.
    Paused,
}

/// What the controller should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// Stop the training task.
    pub preempt: bool,
    /// Resume the training job.
    pub resume: bool,
    /// Queued inference may start.
    pub dispatch: bool,
}

/// The policy of one job, with its clock readings.
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: SharePolicy,
    idle_ms: u64,
    train_slot_ms: u64,
    infer_slot_ms: u64,
    /// When training last started running (or was last resumed).
    train_since: u64,
    /// When training last stopped (inference's turn began).
    infer_since: u64,
    /// The last time a request was queued or running.
    last_busy: u64,
}

impl Scheduler {
    pub fn new(job: &TrainJob, now_ms: u64) -> Scheduler {
        let period = u64::from(job.period_ms);
        let train_slot_ms = (job.share.clamp(0.0, 1.0) * period as f64).round() as u64;
        Scheduler {
            policy: job.policy,
            idle_ms: u64::from(job.idle_ms),
            train_slot_ms,
            infer_slot_ms: period.saturating_sub(train_slot_ms),
            train_since: now_ms,
            infer_since: now_ms,
            last_busy: 0,
        }
    }

    /// Training was (re)started at `now_ms`.
    pub fn started(&mut self, now_ms: u64) {
        self.train_since = now_ms;
    }

    /// Training stopped at `now_ms`.
    pub fn stopped(&mut self, now_ms: u64) {
        self.infer_since = now_ms;
    }

    /// The decision at `now_ms`, given the job and the inference queue.
    pub fn decide(&mut self, now_ms: u64, training: Training, queued: bool, inferring: bool) -> Decision {
        if queued || inferring {
            self.last_busy = now_ms;
        }
        let idle = !queued && !inferring && now_ms.saturating_sub(self.last_busy) >= self.idle_ms;
        match (self.policy, training) {
            (_, Training::Stopping) => Decision::default(),
            (SharePolicy::InferenceFirst, Training::Running) => Decision { preempt: queued, ..Decision::default() },
            (SharePolicy::InferenceFirst, Training::Paused) => Decision { resume: idle, dispatch: true, ..Decision::default() },
            (SharePolicy::TimeShare, Training::Running) => {
                let served = now_ms.saturating_sub(self.train_since) >= self.train_slot_ms;
                Decision { preempt: queued && served, ..Decision::default() }
            }
            (SharePolicy::TimeShare, Training::Paused) => {
                let turn_over = now_ms.saturating_sub(self.infer_since) >= self.infer_slot_ms;
                if idle || (turn_over && !inferring) {
                    Decision { resume: true, ..Decision::default() }
                } else {
                    // At the end of inference's turn new requests wait.
                    Decision { dispatch: !turn_over, ..Decision::default() }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeswitch::protocol::{PreemptMode, SaveMode};

    fn job(policy: SharePolicy, share: f64, period_ms: u32, idle_ms: u32) -> TrainJob {
        TrainJob {
            name: "j".into(),
            entry: "m:f".into(),
            preempt: PreemptMode::Abandon,
            save: SaveMode::Host,
            policy,
            share,
            period_ms,
            idle_ms,
            iterations: 0,
            checkpoint_every: 0,
        }
    }

    /// A GPU simulated in 1 ms ticks: training stops `stop_ms` after it is
    /// told to; requests arrive every `gap_ms` (0: always one waiting) and
    /// run `run_ms` each, one at a time. Returns the ms that training and
    /// inference each had, and every request's wait from arrival to start.
    fn simulate(j: &TrainJob, ms: u64, gap_ms: u64, run_ms: u64, stop_ms: u64) -> (u64, u64, Vec<u64>) {
        let mut s = Scheduler::new(j, 0);
        let mut training = Training::Running;
        let mut stop_at = 0;
        let mut queue: std::collections::VecDeque<u64> = Default::default();
        let mut running: Option<u64> = None; // ends at
        let (mut train_ms, mut infer_ms, mut waits) = (0, 0, Vec::new());
        let mut next_arrival = 0;
        for now in 0..ms {
            if gap_ms == 0 {
                if queue.is_empty() {
                    queue.push_back(now);
                }
            } else if now >= next_arrival {
                queue.push_back(now);
                next_arrival += gap_ms;
            }
            if running.is_some_and(|end| now >= end) {
                running = None;
            }
            if training == Training::Stopping && now >= stop_at {
                training = Training::Paused;
                s.stopped(now);
            }
            let d = s.decide(now, training, !queue.is_empty(), running.is_some());
            if d.preempt {
                assert_eq!(training, Training::Running);
                training = Training::Stopping;
                stop_at = now + stop_ms;
            }
            if d.resume {
                assert!(running.is_none(), "training resumed while a request ran");
                training = Training::Running;
                s.started(now);
            }
            if d.dispatch && running.is_none() && training == Training::Paused {
                if let Some(arrived) = queue.pop_front() {
                    waits.push(now - arrived);
                    running = Some(now + run_ms);
                }
            }
            assert!(!(running.is_some() && training == Training::Running), "both on the GPU at {now}");
            if training == Training::Running {
                train_ms += 1;
            }
            if running.is_some() {
                infer_ms += 1;
            }
        }
        (train_ms, infer_ms, waits)
    }

    #[test]
    fn inference_first_preempts_at_once_and_resumes_after_the_idle_time() {
        let j = job(SharePolicy::InferenceFirst, 0.0, 0, 20);
        let mut s = Scheduler::new(&j, 0);
        assert_eq!(s.decide(5, Training::Running, false, false), Decision::default());
        let d = s.decide(6, Training::Running, true, false);
        assert!(d.preempt && !d.dispatch, "a request stops training; it waits until training has stopped");
        assert_eq!(s.decide(7, Training::Stopping, true, false), Decision::default());
        s.stopped(8);
        let d = s.decide(8, Training::Paused, true, false);
        assert!(d.dispatch && !d.resume);
        assert!(!s.decide(10, Training::Paused, false, true).resume, "a request runs");
        assert!(!s.decide(29, Training::Paused, false, false).resume, "idle 19 ms of 20");
        assert!(s.decide(30, Training::Paused, false, false).resume, "idle 20 ms");
        // Requests every 10 ms of 2 ms each, idle time 20 ms: training never
        // resumes, and no request waits for more than the stop.
        let (train, infer, waits) = simulate(&j, 2000, 10, 2, 3);
        assert!(train < 10, "training ran {train} ms under steady load");
        assert_eq!(infer, 2 * waits.len() as u64);
        assert!(waits.iter().all(|&w| w <= 3), "{waits:?}");
        // Requests every 100 ms: training runs in between.
        let (train, _, waits) = simulate(&j, 2000, 100, 2, 3);
        assert!(train > 2000 - 20 * (2 + 3 + 20 + 1), "training ran only {train} ms");
        assert!(waits.iter().all(|&w| w <= 3), "{waits:?}");
    }

    #[test]
    fn time_share_gives_the_configured_shares_under_load() {
        for (share, period) in [(0.5, 100), (0.75, 200), (0.25, 400), (0.9, 1000)] {
            let j = job(SharePolicy::TimeShare, share, period, 50);
            // A request always waiting, 3 ms each; stops take 1 ms.
            let (train, infer, _) = simulate(&j, 20_000, 0, 3, 1);
            let got = train as f64 / (train + infer) as f64;
            assert!((got - share).abs() < 0.03, "share {share} period {period}: training had {got:.3} ({train} / {infer} ms)");
            // Every GPU ms went to one of them but for the stops and the
            // tail of a request at the end of inference's turn.
            let cycles = 20_000 / period as u64;
            assert!(train + infer + cycles * 5 >= 20_000, "{train} + {infer}");
        }
    }

    #[test]
    fn time_share_without_load_is_all_training() {
        let j = job(SharePolicy::TimeShare, 0.5, 100, 10);
        let (train, infer, waits) = simulate(&j, 5000, 1000, 2, 1);
        assert_eq!(infer, 2 * waits.len() as u64);
        assert!(train > 5000 - 5 * 20, "{train}");
        // A lone request waits for at most training's turn.
        assert!(waits.iter().all(|&w| w <= 51), "{waits:?}");
    }
}
