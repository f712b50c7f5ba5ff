//! Byte sizes as people write them in configuration: `4096`, `512M`,
//! `1.5G`, `3GiB` (K, M, G and T are powers of 1024). One parser for every
//! front end (the command line, the Triton backend's configuration).

/// Parses a size: a whole or decimal number, then an optional unit (`B`,
/// `K`/`KB`/`KiB`, `M`..., `G`..., `T`...; any case). A decimal size is
/// rounded down to whole bytes. Errors name the text and why.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (K, M, G or T)")),
    };
    let not_a_size = || format!("{s:?} is not a size (bytes, or a number with K, M, G or T)");
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| format!("{s:?} overflows 64 bits"));
    }
    let v: f64 = num.parse().map_err(|_| not_a_size())?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(not_a_size());
    }
    let bytes = (v * mult as f64).floor();
    // 2^64 is exactly representable: anything at or above it does not fit.
    if bytes >= 18_446_744_073_709_551_616.0 {
        return Err(format!("{s:?} overflows 64 bits"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_and_without_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 512M "), Ok(512 << 20));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("2.7"), Ok(2), "rounded down to whole bytes");
        assert_eq!(parse_size("16T"), Ok(16 << 40));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
    }

    #[test]
    fn bad_sizes_say_why() {
        for (s, why) in [
            ("lots", "unknown size unit"),
            ("", "not a size"),
            ("1.2.3G", "not a size"),
            ("2X", "unknown size unit"),
            ("-1G", "unknown size unit"),
            ("16777216T", "overflows"),
            ("18446744073709551616", "overflows"),
            ("99999999999999999999.5", "overflows"),
        ] {
            let e = parse_size(s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
