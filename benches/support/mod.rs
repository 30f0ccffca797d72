//! What both benches share: quick mode and criterion's settings.

use std::time::Duration;

use criterion::Criterion;

/// `PRISM_BENCH_QUICK=1` (CI): small shapes and short measurements, still checked.
pub fn quick() -> bool {
    std::env::var("PRISM_BENCH_QUICK").is_ok_and(|v| v != "0")
}

/// Ten samples measured for `measurement` after a second's warm-up; in quick mode 300 ms
/// after 100 ms.
pub fn config(measurement: Duration) -> Criterion {
    let (measurement, warm_up) = if quick() {
        (Duration::from_millis(300), Duration::from_millis(100))
    } else {
        (measurement, Duration::from_secs(1))
    };
    Criterion::default()
        .sample_size(10)
        .measurement_time(measurement)
        .warm_up_time(warm_up)
}
