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
//! (tokio timers) does not, except for [`Clock::sleep_until`], which waits for
//! a time of day (a deadline such as a Lease's expiry) and so wakes when a
//! manual clock is moved past it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The current time, from the system or set by hand. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    time: Mutex<DateTime<Utc>>,
    /// Woken whenever the time is moved.
    moved: tokio::sync::Notify,
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
            manual: Some(Arc::new(Manual {
                time: Mutex::new(start),
                moved: tokio::sync::Notify::new(),
            })),
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
            Some(m) => *lock(&m.time),
        }
    }

    /// Waits until the clock shows `deadline` or later: a timer on the system
    /// clock; on a manual clock, until it is moved that far.
    pub async fn sleep_until(&self, deadline: DateTime<Utc>) {
        match &self.manual {
            None => {
                let left = (deadline - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            Some(m) => loop {
                let moved = m.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if *lock(&m.time) >= deadline {
                    return;
                }
                moved.await;
            },
        }
    }

    /// Moves a manual clock forward by `by`; answers the new time.
    ///
    /// # Panics
    /// On the system clock, which nobody can move, or past the end of time.
    pub fn advance(&self, by: Duration) -> DateTime<Utc> {
        let by = chrono::Duration::from_std(by).expect("a duration chrono can represent");
        let m = self.hand("advance");
        let now = {
            let mut t = lock(&m.time);
            *t = t
                .checked_add_signed(by)
                .expect("a time chrono can represent");
            *t
        };
        m.moved.notify_waiters();
        now
    }

    /// Sets a manual clock to `to` (earlier times too: a clock stepped back).
    ///
    /// # Panics
    /// On the system clock.
    pub fn set(&self, to: DateTime<Utc>) {
        let m = self.hand("set");
        *lock(&m.time) = to;
        m.moved.notify_waiters();
    }

    fn hand(&self, what: &str) -> &Manual {
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

    #[tokio::test]
    async fn sleeping_until_a_time_wakes_when_a_manual_clock_gets_there() {
        let clock = Clock::manual(start());
        let deadline = start() + chrono::Duration::seconds(10);
        let waiter = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(deadline).await }
        });
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "woke before the deadline");
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("wakes at the deadline")
            .unwrap();
        // A deadline already passed does not wait.
        clock.sleep_until(start()).await;
        Clock::system().sleep_until(Utc::now()).await;
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
