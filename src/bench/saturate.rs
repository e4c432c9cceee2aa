//! `saturate`: run the fan-out at rising rates until one fails a condition,
//! and report the highest rate that met them all.
//!
//! A rate *keeps up* when nothing is lost or refused, deliveries keep up with
//! what was offered (at least 95%), and the load generator itself kept its
//! schedule (else the number would measure the generator, not the server). It
//! is *sustained* when it also keeps p99 latency within the bound. The search
//! goes on past the latency bound, so the steps show latency by rate, and
//! stops at the first rate that does not keep up (or whose p99 passes
//! `give_up_p99_ms`).

use super::load::{self, Plan};
use super::report::{LoadResult, SaturateResult};

/// Worst lag behind schedule, ms, before a step is judged a generator limit.
const GENERATOR_LAG_MS: f64 = 100.0;

/// How the rate rises.
#[derive(Debug, Clone)]
pub struct Search {
    /// First rate, messages/s.
    pub start: f64,
    /// Each next rate is the previous times this.
    pub factor: f64,
    /// Do not go above this rate.
    pub max_rate: f64,
    /// p99 bound, ms.
    pub p99_bound_ms: f64,
    /// Stop once p99 passes this, ms.
    pub give_up_p99_ms: f64,
}

/// Why `step` at its rate is not sustained, if it is not.
pub fn failure(step: &LoadResult, p99_bound_ms: f64) -> Option<String> {
    if let Some(why) = falls_behind(step) {
        return Some(why);
    }
    if step.latency.p99_ms > p99_bound_ms {
        return Some(format!(
            "p99 {:.2} ms is over the {p99_bound_ms} ms bound",
            step.latency.p99_ms
        ));
    }
    None
}

/// Why `step` does not keep up with its rate, if it does not.
pub fn falls_behind(step: &LoadResult) -> Option<String> {
    let offered = step.expected as f64 / step.duration_s.max(f64::EPSILON);
    if step.lost > 0 || step.incomplete_receivers > 0 {
        return Some(format!(
            "{} deliveries lost ({} receivers incomplete)",
            step.lost, step.incomplete_receivers
        ));
    }
    if step.errors.rate_limited > 0 || step.errors.slow_consumer > 0 {
        return Some(format!(
            "server refused: {} rate-limited, {} slow-consumer",
            step.errors.rate_limited, step.errors.slow_consumer
        ));
    }
    if step.send_lag_max_ms > GENERATOR_LAG_MS {
        return Some(format!(
            "the load generator fell {:.0} ms behind its schedule",
            step.send_lag_max_ms
        ));
    }
    if step.deliveries_per_s < 0.95 * offered {
        return Some(format!(
            "deliveries fell behind: {:.0}/s of {offered:.0}/s offered",
            step.deliveries_per_s
        ));
    }
    None
}

/// Runs the search on `base` (whose rate is replaced at each step).
pub async fn run(base: &Plan, search: &Search) -> anyhow::Result<SaturateResult> {
    anyhow::ensure!(search.factor > 1.0, "--factor must be above 1");
    let mut result = SaturateResult {
        p99_bound_ms: search.p99_bound_ms,
        stopped_because: format!("reached --max-rate {}", search.max_rate),
        ..SaturateResult::default()
    };
    let mut rate = search.start;
    while rate <= search.max_rate {
        let mut plan = base.clone();
        plan.rate = rate;
        let step = load::run(&plan).await?;
        eprintln!(
            "saturate: {rate:.0} msg/s -> {:.0} deliveries/s, p99 {:.2} ms, lost {}",
            step.deliveries_per_s, step.latency.p99_ms, step.lost
        );
        if failure(&step, search.p99_bound_ms).is_none() {
            result.highest_sustained_rate = rate;
            result.highest_sustained_deliveries_per_s = step.deliveries_per_s;
        }
        let behind = falls_behind(&step);
        if behind.is_none() {
            result.highest_rate_keeping_up = rate;
            result.highest_keeping_up_deliveries_per_s = step.deliveries_per_s;
        }
        let p99 = step.latency.p99_ms;
        result.steps.push(step);
        if let Some(why) = behind {
            result.stopped_because = format!("at {rate:.0} msg/s: {why}");
            break;
        }
        if p99 > search.give_up_p99_ms {
            result.stopped_because = format!(
                "at {rate:.0} msg/s: p99 {p99:.1} ms passed {} ms",
                search.give_up_p99_ms
            );
            break;
        }
        rate = (rate * search.factor).round();
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Latency;

    fn good() -> LoadResult {
        LoadResult {
            duration_s: 1.0,
            expected: 1000,
            delivered: 1000,
            deliveries_per_s: 1000.0,
            latency: Latency {
                p99_ms: 1.0,
                ..Latency::default()
            },
            ..LoadResult::default()
        }
    }

    #[test]
    fn each_condition_stops_the_search() {
        assert_eq!(failure(&good(), 5.0), None);
        let lossy = LoadResult { lost: 1, ..good() };
        assert!(failure(&lossy, 5.0).unwrap().contains("lost"));
        let slow = good();
        assert!(failure(&slow, 0.5).unwrap().contains("p99"));
        let behind = LoadResult {
            deliveries_per_s: 500.0,
            ..good()
        };
        assert!(failure(&behind, 5.0).unwrap().contains("fell behind"));
    }
}
