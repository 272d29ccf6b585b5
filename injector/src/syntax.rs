//! The value formats flags and annotations share: port lists, CIDR lists, resource quantities
//! and log levels. Everything the injector writes into `moat-proxy init` arguments goes through
//! these parsers first, so the init container never fails on a value the injector accepted.

pub use moat_core::netaddr::{
    format_list, parse_cidrs, parse_ports, shorten, Cidr, CidrList, PortList, PortRange,
};

/// Parses a Kubernetes resource quantity (`500m`, `1`, `0.5`, `256Mi`, `1G`, `1e3`) and returns
/// its value in base units. Negative quantities are refused (they are never valid resources).
pub fn parse_quantity(s: &str) -> Result<f64, String> {
    let bad = || format!("{} is not a Kubernetes quantity", shorten(s, 30));
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let number = number.strip_prefix('+').unwrap_or(number);
    let digits_ok = !number.is_empty()
        && number != "."
        && number.bytes().filter(|b| *b == b'.').count() <= 1
        && number.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !digits_ok {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| bad())?;
            if !(-30..=30).contains(&e) {
                return Err(bad());
            }
            10f64.powi(e)
        }
        _ => return Err(bad()),
    };
    Ok(value * multiplier)
}

/// Levels accepted in a log filter.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter: a level (`info`) or comma-separated `target=level` directives
/// (`info,moat_proxy=debug`), targets made of letters, digits, `_` and `::`.
pub fn validate_log_level(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{} is not a log level (off, error, warn, info, debug, trace, or target=level)",
            shorten(s, 30)
        )
    };
    if s.is_empty() || s.len() > 200 {
        return Err(bad());
    }
    for directive in s.split(',') {
        let (target, level) = match directive.split_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, directive),
        };
        if !LEVELS.contains(&level) {
            return Err(bad());
        }
        if let Some(t) = target {
            let ok = !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
            if !ok {
                return Err(bad());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let eq = |s: &str, v: f64| {
            let got = parse_quantity(s).unwrap();
            assert!((got - v).abs() < 1e-9 * v.max(1.0), "{s}: {got} != {v}");
        };
        eq("500m", 0.5);
        eq("1", 1.0);
        eq("0.5", 0.5);
        eq("256Mi", 256.0 * 1024.0 * 1024.0);
        eq("1G", 1e9);
        eq("1e3", 1000.0);
        eq("2Gi", 2.0 * 1024f64.powi(3));
        for bad in [
            "", "abc", "-1", "1x", "1.2.3", "Mi", "1 Mi", "1e", ".", "1e99",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "debug",
            "info,moat_proxy=debug",
            "moat_proxy::tls=trace",
        ] {
            assert!(validate_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "verbose", "info,", "x=loud", "a b=info", "$(X)=info"] {
            assert!(validate_log_level(bad).is_err(), "{bad} accepted");
        }
    }
}
