//! Failed authentication attempts, limited per client address.
//!
//! Every credential presented and refused (a wrong bearer token, a wrong
//! api_secret, a JWT not signed with it) costs the client's address one
//! cell of a GCRA rate limiter (`governor`): a burst of
//! `failures_per_minute` failures, then one more each `60 s /
//! failures_per_minute`. A failure beyond that puts the address in a
//! penalty until the limiter would admit a failure again: until then every
//! request from it that carries credentials is answered 429 with
//! `Retry-After`, *before* its credentials are looked at, so guessing gets
//! no faster by being right. Correct credentials cost nothing, so callers
//! that hold them are never limited, however fast they call, unless they
//! share an address with someone guessing. Requests with no credentials at
//! all are not attempts and cost nothing.
//!
//! Addresses are the TCP peer's (a proxy in front of the coordinator makes
//! every client one address); IPv6 addresses count per /64, since a single
//! host usually holds a whole /64. The limiter forgets addresses that have
//! been quiet for a full burst, and the penalty list drops entries once
//! served, so neither grows without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::clock::Clock;

/// A client as the limiter counts it: an IPv4 address, or an IPv6 /64.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ClientKey {
    V4(u32),
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The coordinator's clock as the limiter reads it: time since the epoch.
#[derive(Clone, Debug)]
struct LimiterClock(Clock);

impl governor::clock::Clock for LimiterClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        let since = self.0.now() - chrono::DateTime::UNIX_EPOCH;
        since.to_std().unwrap_or_default()
    }
}

type Limiter = RateLimiter<
    ClientKey,
    DefaultKeyedStateStore<ClientKey>,
    LimiterClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// Failures between two sweeps of addresses the limiter no longer needs.
const SWEEP_EVERY: u64 = 1024;

/// The per-address limit of failed authentications.
pub struct AuthLimiter {
    limiter: Option<Limiter>,
    clock: LimiterClock,
    /// Addresses serving a penalty, and until when (time since the epoch).
    penalties: RwLock<HashMap<ClientKey, Duration>>,
    failures: AtomicU64,
}

impl std::fmt::Debug for AuthLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLimiter")
            .field("on", &self.limiter.is_some())
            .finish_non_exhaustive()
    }
}

impl AuthLimiter {
    /// A burst of `failures_per_minute` failed attempts per address, then one
    /// every `60 s / failures_per_minute`; 0 turns the limit off. Time is
    /// `clock`'s.
    pub fn new(failures_per_minute: u32, clock: Clock) -> AuthLimiter {
        let clock = LimiterClock(clock);
        let limiter = NonZeroU32::new(failures_per_minute).map(|n| {
            RateLimiter::new(
                Quota::per_minute(n),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            )
        });
        AuthLimiter {
            limiter,
            clock,
            penalties: RwLock::default(),
            failures: AtomicU64::new(0),
        }
    }

    /// No limit (tests that are about something else).
    pub fn off() -> AuthLimiter {
        AuthLimiter::new(0, Clock::system())
    }

    /// May a request from `peer` have its credentials checked? `Err` holds
    /// how long the address's penalty still lasts.
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let (Some(_), Some(ip)) = (&self.limiter, peer) else {
            return Ok(());
        };
        let key = ClientKey::of(ip);
        let until = {
            let penalties = self.penalties.read().expect("never poisoned");
            if penalties.is_empty() {
                return Ok(());
            }
            match penalties.get(&key) {
                None => return Ok(()),
                Some(until) => *until,
            }
        };
        let now = self.clock.now();
        if until > now {
            return Err(until - now);
        }
        self.penalties
            .write()
            .expect("never poisoned")
            .retain(|_, until| *until > now);
        Ok(())
    }

    /// A request from `peer` presented credentials that were refused. `Err`
    /// holds how long the address must now wait: this failure was one too
    /// many.
    pub fn failed(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let (Some(limiter), Some(ip)) = (&self.limiter, peer) else {
            return Ok(());
        };
        if self.failures.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
        }
        let key = ClientKey::of(ip);
        let Err(not_until) = limiter.check_key(&key) else {
            return Ok(());
        };
        let now = self.clock.now();
        let wait = not_until.wait_time_from(now);
        let mut penalties = self.penalties.write().expect("never poisoned");
        penalties.retain(|_, until| *until > now);
        penalties.insert(key, now + wait);
        Err(wait)
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(clock: &Clock, secs: i64) {
        clock.set(chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(secs));
    }

    #[test]
    fn a_burst_of_failures_then_a_penalty_that_ends_on_the_clock() {
        let clock = Clock::manual(chrono::DateTime::UNIX_EPOCH);
        at(&clock, 1_000_000);
        let limiter = AuthLimiter::new(6, clock.clone());
        let attacker = Some("192.0.2.7".parse().unwrap());
        let neighbour = Some("192.0.2.8".parse().unwrap());
        for _ in 0..6 {
            assert_eq!(limiter.admit(attacker), Ok(()));
            assert_eq!(limiter.failed(attacker), Ok(()));
        }
        // The seventh failure is one too many: one cell comes back in 10 s.
        assert_eq!(limiter.failed(attacker), Err(Duration::from_secs(10)));
        assert_eq!(limiter.admit(attacker), Err(Duration::from_secs(10)));
        // Another address is not affected.
        assert_eq!(limiter.admit(neighbour), Ok(()));
        assert_eq!(limiter.failed(neighbour), Ok(()));
        at(&clock, 1_000_004);
        assert_eq!(limiter.admit(attacker), Err(Duration::from_secs(6)));
        at(&clock, 1_000_010);
        assert_eq!(limiter.admit(attacker), Ok(()));
        assert_eq!(limiter.failed(attacker), Ok(()));
        assert!(limiter.failed(attacker).is_err());
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_apart_from_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(ClientKey::of(mapped), ClientKey::of(v4));
        assert_ne!(
            ClientKey::of("::".parse().unwrap()),
            ClientKey::of("0.0.0.0".parse().unwrap())
        );
    }

    #[test]
    fn off_or_without_an_address_nothing_is_limited() {
        let off = AuthLimiter::off();
        let peer = Some("192.0.2.7".parse().unwrap());
        for _ in 0..1000 {
            assert_eq!(off.failed(peer), Ok(()));
        }
        let on = AuthLimiter::new(1, Clock::system());
        for _ in 0..10 {
            assert_eq!(on.failed(None), Ok(()));
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
