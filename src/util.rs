//! Small helpers with no better home: a seeded RNG, dates, atomic file writes, byte sizes, the
//! contiguous data of a CPU op's operand.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// A small, fast, seeded generator (SplitMix64). Its sequence never changes between releases,
/// so a seed names the same workload and the same sampled tokens forever.
#[derive(Clone, Debug)]
pub struct Rng64(u64);

impl Rng64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one stream among many (e.g. one request's sampling), independent of
    /// how the streams interleave.
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        let mut base = Self(seed ^ 0x5851_f42d_4c95_7f2d);
        let mixed = base.next_u64() ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self(mixed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` values uniform in `[-scale, scale)`.
    pub fn uniform_f32(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next_f64() * 2.0 - 1.0) * scale as f64) as f32)
            .collect()
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range_inclusive(&mut self, lo: usize, hi: usize) -> usize {
        debug_assert!(lo <= hi);
        let span = (hi - lo) as u64 + 1;
        lo + (self.next_u64() % span) as usize
    }
}

/// `(year, month, day)` of a day count since 1970-01-01 (proleptic Gregorian calendar).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Today's date (UTC) as `YYYY-MM-DD`, for reports.
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a half-written file and a failed run leaves no partial output.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write {}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// `1536 MiB`, `4.00 GiB`: sizes as people read them.
pub fn human_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Parses `4GiB`, `512MiB`, `2G`, `1.5GB` or a plain byte count (for `--kv-cache-memory`).
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size (try 4GiB or 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit '{other}' in '{text}'")),
    };
    let bytes = value * mult;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("size '{text}' must be positive"));
    }
    Ok(bytes as u64)
}

/// A buffer written by several tasks at once, each to elements no other task touches (the
/// columns of a product's parts, a range of a cache's dimensions): what `&mut` cannot say
/// across rayon's tasks.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the tasks write disjoint elements (each user's contract), `T` may move between
// threads, and the borrow keeps the buffer alive and otherwise untouched meanwhile.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T: Copy> Disjoint<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// Copies `values` to elements `at ..`, which must exist (checked).
    ///
    /// # Safety
    /// No other thread may read or write those elements meanwhile.
    pub unsafe fn write(&self, at: usize, values: &[T]) {
        assert!(
            at + values.len() <= self.len,
            "Disjoint::write: past the end"
        );
        // SAFETY: inside the buffer (asserted); no other thread touches them (the caller).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(at), values.len()) }
    }

    /// Sets element `at`, which must exist (checked).
    ///
    /// # Safety
    /// As [`Disjoint::write`].
    pub unsafe fn set(&self, at: usize, value: T) {
        assert!(at < self.len, "Disjoint::set: past the end");
        // SAFETY: as in `write`.
        unsafe { self.ptr.add(at).write(value) }
    }
}

/// The elements of a CPU custom op's operand `s` laid out as `l`, which must be contiguous
/// (`what` names the operand in the error).
pub fn contiguous<'a, T>(
    s: &'a [T],
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert_eq!(human_bytes(4 << 30), "4.00 GiB");
        assert_eq!(human_bytes(46_080), "45.0 KiB");
    }

    #[test]
    fn rng_streams_are_stable_and_distinct() {
        let a: Vec<u64> = {
            let mut r = Rng64::for_stream(0, 1);
            (0..3).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng64::for_stream(0, 1);
            (0..3).map(|_| r.next_u64()).collect()
        };
        let c = Rng64::for_stream(0, 2).next_u64();
        assert_eq!(a, b);
        assert_ne!(a[0], c);
        let mut r = Rng64::new(7);
        for _ in 0..1000 {
            let x = r.range_inclusive(3, 5);
            assert!((3..=5).contains(&x));
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
