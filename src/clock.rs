//! Where the coordinator reads the time of day.
//!
//! Every time-based decision (a worker silent too long, a failover grace
//! elapsed, a route expired or idle, a Lease to renew or take over, change-log
//! rows old enough to compact) compares stored timestamps with
//! [`Clock::now`]. Production uses [`Clock::system`]; tests use
//! [`Clock::manual`] and move time themselves, so what they check is the
//! logic, not how fast the machine is.
//!
//! Clones share one time: advancing a manual clock moves it for every holder.
//! Only the time of day goes through the clock; how often the loops wake up
//! (tokio timers) does not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The current time, from the system or set by hand. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    /// The system's wall clock (`Utc::now()`).
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that shows `start` until [`advance`](Clock::advance)d or
    /// [`set`](Clock::set).
    pub fn manual(start: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    /// Whether this clock is moved by hand.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => Utc::now(),
            Some(t) => *lock(t),
        }
    }

    /// Moves a manual clock forward by `by`; answers the new time.
    ///
    /// # Panics
    /// On the system clock, which nobody can move, or past the end of time.
    pub fn advance(&self, by: Duration) -> DateTime<Utc> {
        let by = chrono::Duration::from_std(by).expect("a duration chrono can represent");
        let mut t = lock(self.hand("advance"));
        *t = t
            .checked_add_signed(by)
            .expect("a time chrono can represent");
        *t
    }

    /// Sets a manual clock to `to` (earlier times too: a clock stepped back).
    ///
    /// # Panics
    /// On the system clock.
    pub fn set(&self, to: DateTime<Utc>) {
        *lock(self.hand("set")) = to;
    }

    fn hand(&self, what: &str) -> &Mutex<DateTime<Utc>> {
        self.manual
            .as_deref()
            .unwrap_or_else(|| panic!("cannot {what} the system clock"))
    }
}

fn lock(t: &Mutex<DateTime<Utc>>) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
    // A time is always whole: a panic elsewhere cannot leave it half-written.
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    #[test]
    fn a_manual_clock_stands_still_until_moved() {
        let clock = Clock::manual(start());
        assert!(clock.is_manual());
        assert_eq!(clock.now(), start());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(clock.now(), start());
        let moved = clock.advance(Duration::from_millis(1500));
        assert_eq!(moved, start() + chrono::Duration::milliseconds(1500));
        assert_eq!(clock.now(), moved);
        clock.set(start() - chrono::Duration::seconds(1));
        assert_eq!(clock.now(), start() - chrono::Duration::seconds(1));
    }

    #[test]
    fn clones_share_one_time() {
        let clock = Clock::manual(start());
        let other = clock.clone();
        clock.advance(Duration::from_secs(30));
        assert_eq!(other.now(), start() + chrono::Duration::seconds(30));
        other.set(start());
        assert_eq!(clock.now(), start());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        c.advance(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(clock.now(), start() + chrono::Duration::milliseconds(400));
    }

    #[test]
    fn the_system_clock_follows_the_system() {
        let clock = Clock::system();
        assert!(!clock.is_manual());
        assert!(!Clock::default().is_manual());
        let before = Utc::now();
        let now = clock.now();
        assert!(before <= now && now <= Utc::now());
    }

    #[test]
    #[should_panic(expected = "cannot advance the system clock")]
    fn the_system_clock_cannot_be_advanced() {
        Clock::system().advance(Duration::from_secs(1));
    }

    #[test]
    #[should_panic(expected = "cannot set the system clock")]
    fn the_system_clock_cannot_be_set() {
        Clock::system().set(start());
    }
}
