//! The wall clock that decides budget periods (SPEC §6: UTC days and months).
//!
//! Tests must see a budget period roll over without waiting for midnight, so the clock can be
//! shifted by a number of seconds read from `CLOCK_OFFSET_FILE` (a testing aid; unset in
//! production, where the offset stays 0). Only budget periods use this clock; latencies, rate
//! windows and leases use the real one.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

static OFFSET_SECS: AtomicI64 = AtomicI64::new(0);

/// Now, as budget periods see it.
pub fn now() -> DateTime<Utc> {
    Utc::now() + TimeDelta::seconds(OFFSET_SECS.load(Ordering::Relaxed))
}

/// The periods of now, as budget periods see it. Every admission asks; the calendar
/// arithmetic runs once per UTC day and thread.
pub fn periods_now() -> Periods {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .saturating_add(OFFSET_SECS.load(Ordering::Relaxed));
    periods_at_unix(secs)
}

fn periods_at_unix(secs: i64) -> Periods {
    let day = secs.div_euclid(86_400);
    thread_local! {
        static LAST: Cell<Option<(i64, Periods)>> = const { Cell::new(None) };
    }
    LAST.with(|last| match last.get() {
        Some((seen, periods)) if seen == day => periods,
        _ => {
            let periods = Periods::at(DateTime::from_timestamp(secs, 0).unwrap_or_default());
            last.set(Some((day, periods)));
            periods
        }
    })
}

/// Reads the offset file once (the CLI) or whenever it changes (the server, via [`OffsetFile`]).
pub fn load_offset(path: &Path) {
    let secs = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    OFFSET_SECS.store(secs, Ordering::Relaxed);
}

/// The UTC calendar periods a moment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub day: NaiveDate,
}

impl Periods {
    pub fn at(t: DateTime<Utc>) -> Self {
        Self {
            day: t.date_naive(),
        }
    }

    pub fn month_start(&self) -> NaiveDate {
        self.day.with_day(1).unwrap_or(self.day)
    }

    /// `YYYYMMDD`: ordered as numbers, so a counter is only ever rolled forward.
    pub fn day_stamp(&self) -> String {
        self.day_number().to_string()
    }

    /// `YYYYMM`.
    pub fn month_stamp(&self) -> String {
        self.month_number().to_string()
    }

    /// [`Self::day_stamp`] as a number (what Redis receives: the same digits).
    pub fn day_number(&self) -> i64 {
        self.month_number() * 100 + i64::from(self.day.day())
    }

    pub fn month_number(&self) -> i64 {
        i64::from(self.day.year()) * 100 + i64::from(self.day.month())
    }
}

/// Time from `now` until the next UTC midnight (daily) or first of the month (monthly).
pub fn until_period_end(now: DateTime<Utc>, monthly: bool) -> Duration {
    let day = now.date_naive();
    let next = if monthly {
        let (y, m) = if day.month() == 12 {
            (day.year() + 1, 1)
        } else {
            (day.year(), day.month() + 1)
        };
        NaiveDate::from_ymd_opt(y, m, 1)
    } else {
        day.succ_opt()
    };
    next.and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc() - now)
        .and_then(|d| d.to_std().ok())
        .unwrap_or(Duration::from_secs(1))
}

/// Follows `CLOCK_OFFSET_FILE` while the server runs.
pub struct OffsetFile(pub PathBuf);

#[async_trait]
impl BackgroundService for OffsetFile {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tick.tick() => load_offset(&self.0),
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cached_periods_change_with_the_utc_day() {
        let midnight = at("2026-12-31T00:00:00Z").timestamp();
        // Same day, the next day, back to an earlier day, a month and a year later.
        for secs in [
            midnight + 5,
            midnight + 86_399,
            midnight + 86_400,
            midnight - 1,
            midnight + 86_400 * 32,
            midnight,
        ] {
            let want = Periods::at(DateTime::from_timestamp(secs, 0).unwrap());
            assert_eq!(periods_at_unix(secs), want, "{secs}");
        }
    }

    #[test]
    fn periods_and_their_ends_are_utc() {
        let t = at("2026-12-31T23:59:30Z");
        let p = Periods::at(t);
        assert_eq!(p.day_stamp(), "20261231");
        assert_eq!(p.month_stamp(), "202612");
        assert_eq!(p.month_start().to_string(), "2026-12-01");
        assert_eq!(until_period_end(t, false), Duration::from_secs(30));
        assert_eq!(until_period_end(t, true), Duration::from_secs(30));
        let mid = at("2026-11-22T12:00:00+02:00");
        assert_eq!(Periods::at(mid).day_stamp(), "20261122");
        let early = Periods::at(at("2027-01-05T00:00:00Z"));
        assert_eq!(
            (early.day_stamp().as_str(), early.month_number()),
            ("20270105", 202701)
        );
        assert_eq!(
            until_period_end(mid, true),
            Duration::from_secs(8 * 86_400 + 14 * 3600)
        );
    }
}
