//! Sizes as qemu's tools read and print them.

/// Parses a size with qemu's optional suffix: `k`/`K`, `M`, `G`, `T`, `P`, `E` (powers of
/// 1024), `b`/`B` for bytes; decimal fractions (`1.5G`) and hex (`0x1000`) are accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("invalid size '{s}'");
    let s_trim = s.trim();
    if let Some(hex) = s_trim
        .strip_prefix("0x")
        .or_else(|| s_trim.strip_prefix("0X"))
    {
        return u64::from_str_radix(hex, 16).map_err(|_| err());
    }
    let split = s_trim
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s_trim.len());
    let (num, suffix) = s_trim.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(err()),
    };
    if num.is_empty() {
        return Err(err());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(err());
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| err())?
    };
    let mut value = int.checked_shl(shift).filter(|v| v >> shift == int);
    if !frac.is_empty() {
        // Fractions must come out to whole bytes, as in qemu.
        let digits = frac.len() as u32;
        let frac_num: u128 = frac.parse().map_err(|_| err())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(err)?;
        let bytes = frac_num << shift;
        if bytes % scale != 0 {
            return Err(err());
        }
        value = value.and_then(|v| v.checked_add(u64::try_from(bytes / scale).ok()?));
    }
    value.ok_or_else(|| format!("size '{s}' is too large"))
}

/// `size_to_str` style: three significant digits and a binary unit, e.g. `1.46 GiB`,
/// `64 MiB`, `0 B` (qemu-img info's "virtual size").
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    // Switch to the next unit once the value would print as 1000 or more.
    while value >= 999.5 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // Three significant digits, like printf's %0.3g.
    let decimals = if value == 0.0 {
        0
    } else {
        (2 - value.log10().floor() as i32).max(0) as usize
    };
    let mut s = format!("{value:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}", UNITS[unit])
}

/// qemu-io's `cvtstr`: three decimals and a binary unit, `.000` dropped, e.g. `4 KiB`,
/// `1.500 MiB`, `100 bytes`.
pub fn io_size(value: f64) -> String {
    const UNITS: [(f64, &str); 5] = [
        (1099511627776.0 * 1024.0, "PiB"),
        (1099511627776.0, "TiB"),
        (1073741824.0, "GiB"),
        (1048576.0, "MiB"),
        (1024.0, "KiB"),
    ];
    for (scale, name) in UNITS {
        if value >= scale {
            return strip_zero_decimals(format!("{:.3}", value / scale), name);
        }
    }
    strip_zero_decimals(format!("{value:.3}"), "bytes")
}

fn strip_zero_decimals(num: String, unit: &str) -> String {
    let num = num.strip_suffix(".000").unwrap_or(&num);
    format!("{num} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_suffixes_fractions_and_hex() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4T").unwrap(), 4 << 40);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(parse_size("10b").unwrap(), 10);
    }

    #[test]
    fn rejects_garbage_negative_fractional_bytes_and_overflow() {
        for bad in [
            "",
            "1x",
            "-1",
            "1.3",
            "k",
            "1.2.3",
            "20E",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_size_matches_qemu_img_info() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(67108864), "64 MiB");
        assert_eq!(human_size(1572864000), "1.46 GiB");
        assert_eq!(human_size(69632), "68 KiB");
        assert_eq!(human_size(1000), "0.977 KiB");
    }

    #[test]
    fn io_size_matches_qemu_io() {
        assert_eq!(io_size(4096.0), "4 KiB");
        assert_eq!(io_size(5000.0), "4.883 KiB");
        assert_eq!(io_size(1572864.0), "1.500 MiB");
        assert_eq!(io_size(100.0), "100 bytes");
        assert_eq!(io_size(0.0), "0 bytes");
    }
}
