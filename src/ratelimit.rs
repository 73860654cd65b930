//! Rate limits per (requester, asset), kept by the shard that owns the asset (pure code:
//! time is passed in).
//!
//! GCRA (the generic cell rate algorithm), exact for "`requests` per `period`": each
//! request moves a theoretical arrival time (TAT) forward by the emission interval
//! `T = period / requests`; a request is allowed while `TAT - now <= period - T`, so a
//! burst of `requests` at once is allowed and then one every `T`. A caller that keeps to
//! its rate is never refused, however long it runs (the article's flaw 4: its counter
//! reset on a fixed window and locked steady callers out).
//!
//! Memory is bounded: a bucket whose TAT has passed holds nothing a fresh bucket would not,
//! so idle buckets are dropped when the map is full; if every bucket is still busy, the new
//! (requester, asset) is refused until the first one goes idle (fail closed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// `requests` per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub period: Duration,
}

impl RateLimit {
    /// Parses `"<requests>/<seconds>s"`, e.g. `"100/60s"`.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let bad = || format!("{text:?} is not <requests>/<seconds>s, e.g. \"100/60s\"");
        let (n, p) = text.split_once('/').ok_or_else(bad)?;
        let requests: u32 = n.trim().parse().map_err(|_| bad())?;
        let secs: u64 = p
            .trim()
            .strip_suffix('s')
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if requests == 0 || secs == 0 || secs > 86_400 {
            return Err(format!(
                "{text:?}: need at least 1 request per 1 to 86400 seconds"
            ));
        }
        Ok(RateLimit {
            requests,
            period: Duration::from_secs(secs),
        })
    }

    /// The emission interval T, in nanoseconds (at least 1).
    fn interval_ns(&self) -> u64 {
        (self.period.as_nanos() as u64 / u64::from(self.requests)).max(1)
    }

    /// The burst tolerance, `period - T`, in nanoseconds.
    fn tolerance_ns(&self) -> u64 {
        (self.period.as_nanos() as u64).saturating_sub(self.interval_ns())
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}s", self.requests, self.period.as_secs())
    }
}

/// A request over its limit: when to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// The (requester, asset) is over its rate; allowed again after this long.
    Rate { retry_after: Duration },
    /// Every bucket of the shard is busy; one goes idle after this long.
    Full { retry_after: Duration },
}

/// One shard's buckets.
pub struct RateLimiter {
    /// TAT of each (requester, asset, class), in nanoseconds on the caller's clock. The
    /// class keeps one identity's budgets apart (the gate passes the role).
    tat: HashMap<(Arc<str>, Uuid, u8), u64>,
    max_buckets: usize,
}

impl RateLimiter {
    pub fn new(max_buckets: usize) -> RateLimiter {
        RateLimiter {
            tat: HashMap::new(),
            max_buckets: max_buckets.max(1),
        }
    }

    pub fn buckets(&self) -> usize {
        self.tat.len()
    }

    /// Takes one request of `requester` on `asset` in `class` at `now_ns`, or says when
    /// to retry.
    pub fn check(
        &mut self,
        requester: &Arc<str>,
        asset: Uuid,
        class: u8,
        limit: RateLimit,
        now_ns: u64,
    ) -> Result<(), Limited> {
        let (t, tau) = (limit.interval_ns(), limit.tolerance_ns());
        let key = (requester.clone(), asset, class);
        if let Some(tat) = self.tat.get_mut(&key) {
            let start = (*tat).max(now_ns);
            if start - now_ns > tau {
                return Err(Limited::Rate {
                    retry_after: Duration::from_nanos(start - now_ns - tau),
                });
            }
            *tat = start + t;
            return Ok(());
        }
        if self.tat.len() >= self.max_buckets {
            // Idle buckets (TAT passed) are the same as no bucket: drop them.
            self.tat.retain(|_, tat| *tat > now_ns);
            if self.tat.len() >= self.max_buckets {
                let soonest = self.tat.values().min().copied().unwrap_or(now_ns);
                return Err(Limited::Full {
                    retry_after: Duration::from_nanos(soonest.saturating_sub(now_ns).max(1)),
                });
            }
        }
        self.tat.insert(key, now_ns + t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limit(n: u32, secs: u64) -> RateLimit {
        RateLimit {
            requests: n,
            period: Duration::from_secs(secs),
        }
    }

    #[test]
    fn exactly_the_limit_in_a_burst_then_one_per_interval() {
        let mut l = RateLimiter::new(16);
        let who: Arc<str> = Arc::from("svc");
        let a = Uuid::from_u128(1);
        let lim = limit(100, 60);
        for i in 0..100 {
            assert_eq!(l.check(&who, a, 0, lim, 0), Ok(()), "request {i}");
        }
        // The 101st at the same instant waits one interval (0.6 s), to the nanosecond.
        assert_eq!(
            l.check(&who, a, 0, lim, 0),
            Err(Limited::Rate {
                retry_after: Duration::from_millis(600)
            })
        );
        assert!(l.check(&who, a, 0, lim, 600_000_000 - 1).is_err());
        assert_eq!(l.check(&who, a, 0, lim, 600_000_000), Ok(()));
        // Other assets and other requesters have their own buckets.
        assert_eq!(l.check(&who, Uuid::from_u128(2), 0, lim, 0), Ok(()));
        assert_eq!(l.check(&Arc::from("other"), a, 0, lim, 0), Ok(()));
        // And so has the same requester under another role (class).
        assert_eq!(l.check(&who, a, 1, lim, 0), Ok(()));
    }

    #[test]
    fn a_steady_caller_within_its_limit_is_never_refused() {
        // The article's flaw 4: 100 per 60 s, called every 0.6 s for a day.
        let mut l = RateLimiter::new(4);
        let who: Arc<str> = Arc::from("steady");
        let lim = limit(100, 60);
        let step = 600_000_000;
        for i in 0..144_000u64 {
            assert_eq!(
                l.check(&who, Uuid::nil(), 0, lim, i * step),
                Ok(()),
                "call {i}"
            );
        }
        // Twice as fast is held to the limit: half refused over a long run.
        let mut l = RateLimiter::new(4);
        let refused = (0..20_000u64)
            .filter(|i| l.check(&who, Uuid::nil(), 0, lim, i * step / 2).is_err())
            .count();
        assert!((9_900..=10_000).contains(&refused), "{refused}");
    }

    #[test]
    fn buckets_are_bounded_idle_ones_go_and_busy_ones_fail_closed() {
        let mut l = RateLimiter::new(3);
        let lim = limit(1, 10);
        for n in 0..3u128 {
            l.check(&Arc::from(format!("r{n}")), Uuid::nil(), 0, lim, 0)
                .unwrap();
        }
        // Full of busy buckets: a fourth caller waits until the first goes idle.
        assert_eq!(
            l.check(&Arc::from("r3"), Uuid::nil(), 0, lim, 5 * S),
            Err(Limited::Full {
                retry_after: Duration::from_secs(5)
            })
        );
        assert_eq!(l.buckets(), 3);
        // Once they are idle they are dropped to make room.
        assert_eq!(
            l.check(&Arc::from("r3"), Uuid::nil(), 0, lim, 10 * S),
            Ok(())
        );
        assert_eq!(l.buckets(), 1);
    }

    #[test]
    fn limits_parse_and_refuse_nonsense() {
        assert_eq!(RateLimit::parse("100/60s"), Ok(limit(100, 60)));
        assert_eq!(RateLimit::parse(" 5 / 1s"), Ok(limit(5, 1)));
        assert_eq!(limit(100, 60).to_string(), "100/60s");
        for bad in [
            "",
            "100",
            "100/60",
            "0/60s",
            "100/0s",
            "x/1s",
            "1/100000s",
            "-1/1s",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad:?}");
        }
    }
}
