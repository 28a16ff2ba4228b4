//! Kubernetes resource quantities (`"500m"`, `"1Gi"`, `"1G"`, `"1.5"`, `"2e3"`), read exactly.
//!
//! A quantity is held as a whole number of nano-units (10^-9), the finest precision Kubernetes
//! keeps; finer fractions round up, as the API server rounds them. `i128` holds every quantity
//! the API server accepts (up to 2^63 of the largest suffix) with room to add them up.

use core::fmt;
use core::ops::{Div, Rem};

/// A parsed quantity, in nano-units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity {
    nanos: i128,
}

/// Why a quantity could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantityError {
    /// Not of the form `<sign><digits>[.<digits>]<suffix>`.
    Malformed,
    /// Too large to hold.
    OutOfRange,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "not a Kubernetes quantity",
            Self::OutOfRange => "out of range",
        })
    }
}

/// Powers of ten from nano-units up to the largest decimal suffix and exponent kept.
const MAX_DECIMAL_EXPONENT: i32 = 36;

impl Quantity {
    pub const ZERO: Quantity = Quantity { nanos: 0 };

    /// The quantity in nano-units (10^-9 of the unit).
    pub fn nanos(self) -> i128 {
        self.nanos
    }

    pub fn from_nanos(nanos: i128) -> Self {
        Self { nanos }
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Quantity) -> Option<Quantity> {
        self.nanos
            .checked_add(other.nanos)
            .map(Quantity::from_nanos)
    }

    /// Reads a quantity as Kubernetes writes it: an optional sign, a decimal number, then a binary
    /// suffix (`Ki`..`Ei`), a decimal suffix (`n`, `u`, `m`, none, `k`, `M`..`E`) or an exponent
    /// (`e3`, `E-2`).
    pub fn parse(text: &str) -> Result<Quantity, QuantityError> {
        let text = text.trim();
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_end);
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(QuantityError::Malformed);
        }
        let (decimal, binary) = suffix_scale(suffix)?;
        // Trailing zeros of the fraction and leading zeros of the whole part carry no value.
        let fraction = fraction.trim_end_matches('0');
        let whole = whole.trim_start_matches('0');
        let digits = || whole.bytes().chain(fraction.bytes()).map(|d| d - b'0');
        // Up to 19 digits always fit a u64 (10^19 - 1 < 2^64), so they are read without overflow
        // checks: in WebAssembly guests a checked u64 multiplication is a 128-bit library call,
        // as is all of i128's arithmetic.
        let mantissa = if whole.len() + fraction.len() <= 19 {
            i128::from(digits().fold(0u64, |m, d| m * 10 + u64::from(d)))
        } else {
            digits()
                .try_fold(0i128, |m, d| m.checked_mul(10)?.checked_add(d.into()))
                .ok_or(QuantityError::OutOfRange)?
        };
        let fraction_digits =
            i32::try_from(fraction.len()).map_err(|_| QuantityError::OutOfRange)?;
        // value = mantissa * 10^(9 + decimal - fraction_digits) * 2^binary nano-units.
        let mut value = checked_product(mantissa, i128::from(1u64 << binary))
            .ok_or(QuantityError::OutOfRange)?;
        let exponent = 9 + decimal - fraction_digits;
        if exponent >= 0 {
            if exponent > MAX_DECIMAL_EXPONENT && value != 0 {
                return Err(QuantityError::OutOfRange);
            }
            value = checked_product(value, pow10(exponent.min(MAX_DECIMAL_EXPONENT)))
                .ok_or(QuantityError::OutOfRange)?;
        } else if value != 0 {
            // Below a nano-unit: rounds up (away from zero), as the API server does.
            let divisor = if -exponent > MAX_DECIMAL_EXPONENT {
                None
            } else {
                Some(pow10(-exponent))
            };
            value = match divisor {
                Some(d) => value.div_euclid(d) + i128::from(value.rem_euclid(d) != 0),
                None => 1,
            };
        }
        Ok(Quantity {
            nanos: if negative { -value } else { value },
        })
    }
}

/// The decimal exponent and binary shift of a suffix.
fn suffix_scale(suffix: &str) -> Result<(i32, u32), QuantityError> {
    // Byte-string patterns, which are matched byte by byte; `&str` ones are compared by calling
    // memcmp per arm, which is not cheap in WebAssembly guests.
    Ok(match suffix.as_bytes() {
        b"" => (0, 0),
        b"n" => (-9, 0),
        b"u" => (-6, 0),
        b"m" => (-3, 0),
        b"k" => (3, 0),
        b"M" => (6, 0),
        b"G" => (9, 0),
        b"T" => (12, 0),
        b"P" => (15, 0),
        b"E" => (18, 0),
        b"Ki" => (0, 10),
        b"Mi" => (0, 20),
        b"Gi" => (0, 30),
        b"Ti" => (0, 40),
        b"Pi" => (0, 50),
        b"Ei" => (0, 60),
        _ => {
            let digits = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))
                .ok_or(QuantityError::Malformed)?;
            let unsigned = digits
                .strip_prefix('-')
                .or_else(|| digits.strip_prefix('+'))
                .unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(QuantityError::Malformed);
            }
            let exponent: i32 = digits.parse().map_err(|_| QuantityError::OutOfRange)?;
            if exponent.unsigned_abs() > 1000 {
                return Err(QuantityError::OutOfRange);
            }
            (exponent, 0)
        }
    })
}

/// `a * b` for non-negative `a` and `b`, `None` on overflow. Worked in u64 when the product
/// surely fits (the factors' significant bits add up to at most 64), as for most quantities: that
/// multiplication is native in WebAssembly, while a checked one, or i128's, is a library call.
fn checked_product(a: i128, b: i128) -> Option<i128> {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(small_a), Ok(small_b)) if small_a.leading_zeros() + small_b.leading_zeros() >= 64 => {
            Some(i128::from(small_a * small_b))
        }
        _ => a.checked_mul(b),
    }
}

/// `10^exponent` for `exponent` in `0..=MAX_DECIMAL_EXPONENT`.
fn pow10(exponent: i32) -> i128 {
    const POWERS: [i128; MAX_DECIMAL_EXPONENT as usize + 1] = {
        let mut powers = [1i128; MAX_DECIMAL_EXPONENT as usize + 1];
        let mut i = 1;
        while i < powers.len() {
            powers[i] = powers[i - 1] * 10;
            i += 1;
        }
        powers
    };
    POWERS[exponent.clamp(0, MAX_DECIMAL_EXPONENT) as usize]
}

impl fmt::Display for Quantity {
    /// Shortest exact decimal form: `500m`, `2`, `1073741824`, `1500u`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Most quantities fit an i64, whose arithmetic and formatting are native in WebAssembly
        // guests; i128's are library calls.
        match i64::try_from(self.nanos) {
            Ok(nanos) => write_exact(f, nanos),
            Err(_) => write_exact(f, self.nanos),
        }
    }
}

fn write_exact<T>(f: &mut fmt::Formatter<'_>, nanos: T) -> fmt::Result
where
    T: Copy + fmt::Display + PartialEq + From<i32> + Rem<Output = T> + Div<Output = T>,
{
    for (scale, suffix) in [(1_000_000_000, ""), (1_000_000, "m"), (1_000, "u")] {
        let scale = T::from(scale);
        if nanos % scale == T::from(0) {
            return write!(f, "{}{suffix}", nanos / scale);
        }
    }
    write!(f, "{nanos}n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use proptest::prelude::*;

    fn q(text: &str) -> i128 {
        Quantity::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .nanos()
    }

    const UNIT: i128 = 1_000_000_000;

    /// Unsigned quantities read digit by digit in i128, powers by `checked_pow`.
    fn plain(text: &str) -> Result<i128, QuantityError> {
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(QuantityError::Malformed);
        }
        let fraction = fraction.trim_end_matches('0');
        let (decimal, binary) = suffix_scale(suffix)?;
        let mut mantissa = 0i128;
        for digit in whole.bytes().chain(fraction.bytes()) {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(i128::from(digit - b'0')))
                .ok_or(QuantityError::OutOfRange)?;
        }
        let mantissa = mantissa
            .checked_mul(1 << binary)
            .ok_or(QuantityError::OutOfRange)?;
        let exponent = 9 + decimal - fraction.len() as i32;
        if mantissa == 0 {
            return Ok(0);
        }
        if exponent >= 0 {
            10i128
                .checked_pow(exponent as u32)
                .and_then(|p| mantissa.checked_mul(p))
                .ok_or(QuantityError::OutOfRange)
        } else {
            Ok(match 10i128.checked_pow(exponent.unsigned_abs()) {
                Some(d) => mantissa / d + i128::from(mantissa % d != 0),
                None => 1,
            })
        }
    }

    #[test]
    fn decimal_and_binary_suffixes() {
        assert_eq!(q("500m"), UNIT / 2);
        assert_eq!(q("0.5"), UNIT / 2);
        assert_eq!(q("2"), 2 * UNIT);
        assert_eq!(q("1k"), 1_000 * UNIT);
        assert_eq!(q("1G"), 1_000_000_000 * UNIT);
        assert_eq!(q("1Gi"), (1i128 << 30) * UNIT);
        assert_eq!(q("1.5Gi"), (3i128 << 29) * UNIT);
        assert_eq!(q("128Mi"), (128i128 << 20) * UNIT);
        assert_eq!(q("1Ei"), (1i128 << 60) * UNIT);
        assert_eq!(q("1E"), 10i128.pow(18) * UNIT);
        assert_eq!(q("250u"), 250_000);
        assert_eq!(q("7n"), 7);
        assert_eq!(q(".5"), UNIT / 2);
        assert_eq!(q("5."), 5 * UNIT);
        assert_eq!(q("-1"), -UNIT);
        assert_eq!(q("+1m"), UNIT / 1000);
        assert_eq!(q("007"), 7 * UNIT);
        assert_eq!(q("1.000000000000000000000000000000000000000000"), UNIT);
    }

    #[test]
    fn exponents() {
        assert_eq!(q("2e3"), 2_000 * UNIT);
        assert_eq!(q("2E3"), 2_000 * UNIT);
        assert_eq!(q("1e-3"), UNIT / 1000);
        assert_eq!(q("1e+2"), 100 * UNIT);
    }

    #[test]
    fn below_a_nano_unit_rounds_up() {
        assert_eq!(q("0.1n"), 1);
        assert_eq!(q("1e-12"), 1);
        assert_eq!(q("1.0000000001"), UNIT + 1);
        assert_eq!(q("0e-200"), 0);
        assert_eq!(q("1e-200"), 1);
    }

    #[test]
    fn malformed_and_out_of_range() {
        for bad in [
            "", "m", "1x", "1 Gi", "1.2.3", "--1", "1e", "1e+", "1Gi1", "1ki", "1KI", ".", "1e3.5",
        ] {
            assert_eq!(
                Quantity::parse(bad),
                Err(QuantityError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(Quantity::parse("1e5000"), Err(QuantityError::OutOfRange));
        assert_eq!(
            Quantity::parse("99999999999999999999999999999999999999999"),
            Err(QuantityError::OutOfRange)
        );
    }

    #[test]
    fn display_is_exact() {
        assert_eq!(format!("{}", Quantity::parse("500m").unwrap()), "500m");
        assert_eq!(format!("{}", Quantity::parse("1Gi").unwrap()), "1073741824");
        assert_eq!(format!("{}", Quantity::parse("1.5m").unwrap()), "1500u");
        // Beyond an i64 of nano-units.
        assert_eq!(
            format!("{}", Quantity::parse("1Ei").unwrap()),
            "1152921504606846976"
        );
        assert_eq!(
            format!("{}", Quantity::from_nanos(-(1i128 << 80) - 1)),
            "-1208925819614629174706177n"
        );
    }

    proptest! {
        #[test]
        fn suffixes_scale_exactly(n in 0u32..1_000_000) {
            let n128 = i128::from(n);
            prop_assert_eq!(q(&format!("{n}m")) * 1000, q(&format!("{n}")));
            prop_assert_eq!(q(&format!("{n}Ki")), q(&format!("{n}")) * 1024);
            prop_assert_eq!(q(&format!("{n}Mi")), q(&format!("{n}Ki")) * 1024);
            prop_assert_eq!(q(&format!("{n}k")), q(&format!("{n}e3")));
            prop_assert_eq!(q(&format!("{n}G")), n128 * UNIT * 1_000_000_000);
            // A decimal point moves the value exactly.
            prop_assert_eq!(q(&format!("{}.{:03}", n / 1000, n % 1000)), q(&format!("{n}m")));
        }

        #[test]
        fn display_round_trips(nanos in prop_oneof![
            -1_000_000_000_000_000i128..1_000_000_000_000_000,
            // Past what an i64 holds.
            -(1i128 << 100)..(1i128 << 100),
        ]) {
            let quantity = Quantity::from_nanos(nanos);
            prop_assert_eq!(Quantity::parse(&format!("{quantity}")), Ok(quantity));
        }

        /// The u64 fast path and the table of powers give what plain i128 arithmetic gives.
        #[test]
        fn matches_plain_i128_arithmetic(
            whole in "[0-9]{0,24}",
            fraction in proptest::option::of("[0-9]{0,14}"),
            suffix in prop_oneof![
                Just(alloc::string::String::new()), Just("m".into()), Just("n".into()), Just("Ki".into()),
                Just("Gi".into()), Just("Ei".into()), Just("E".into()), Just("k".into()),
                // Up to the largest exponent kept (9 + 27 = 36).
                (-40i32..=27).prop_map(|e| format!("e{e}")),
            ],
        ) {
            let text = match &fraction {
                Some(fraction) => format!("{whole}.{fraction}{suffix}"),
                None => format!("{whole}{suffix}"),
            };
            prop_assert_eq!(Quantity::parse(&text).map(Quantity::nanos), plain(&text));
        }

        #[test]
        fn never_panics(text in "[-+0-9.eEmkKMGTPinu]{0,24}") {
            let _ = Quantity::parse(&text);
        }
    }
}
