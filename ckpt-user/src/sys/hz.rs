//! The kernel's tick rate (CONFIG_HZ): lease deadlines are in jiffies.

use std::io::Read as _;

use anyhow::{bail, Result};

/// Tick rates Linux can be built with.
const KNOWN: [u32; 4] = [100, 250, 300, 1000];

fn from_config(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

/// CONFIG_HZ from the running kernel's config (/boot/config-$(uname -r) or
/// /proc/config.gz), else measured from the jiffies counter in /proc/timer_list.
pub fn kernel_hz() -> Result<u32> {
    let release = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned();
    if let Some(hz) = std::fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .and_then(|t| from_config(&t))
    {
        return Ok(hz);
    }
    if let Ok(gz) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .is_ok()
        {
            if let Some(hz) = from_config(&text) {
                return Ok(hz);
            }
        }
    }
    measure()
}

fn timer_list_jiffies() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("jiffies: "))
        .and_then(|v| v.trim().parse().ok())
}

fn measure() -> Result<u32> {
    let t0 = std::time::Instant::now();
    let Some(j0) = timer_list_jiffies() else {
        bail!("cannot determine CONFIG_HZ: no kernel config and no /proc/timer_list");
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let j1 = timer_list_jiffies().unwrap_or(j0);
    let rate = (j1 - j0) as f64 / t0.elapsed().as_secs_f64();
    Ok(nearest(rate))
}

fn nearest(rate: f64) -> u32 {
    *KNOWN
        .iter()
        .min_by(|a, b| {
            (f64::from(**a) - rate)
                .abs()
                .total_cmp(&(f64::from(**b) - rate).abs())
        })
        .expect("KNOWN is not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_measurement() {
        assert_eq!(
            from_config("# x\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(from_config("CONFIG_HZ_250=y\n"), None);
        assert_eq!(nearest(247.3), 250);
        assert_eq!(nearest(990.0), 1000);
        assert_eq!(nearest(290.0), 300);
    }
}
