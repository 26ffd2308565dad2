//! Python's `random.Random`, bit for bit, for the calls vLLM's dataset sampling makes.
//!
//! vLLM samples ShareGPT with `random.seed(seed)` then `random.shuffle(data)` (and pads a short
//! sample with `random.choice`). Reproducing CPython's Mersenne Twister, its integer seeding and
//! its rejection sampling exactly means `--seed 0` picks the very conversations vLLM picks from
//! the same file with the same tokenizer, so the two tools' figures describe the same work.

const N: usize = 624;
const M: usize = 397;

/// CPython's `random.Random` state (MT19937 seeded by `init_by_array`).
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        // CPython splits abs(seed) into 32-bit words, least significant first; 0 gives [0].
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut rng = Self::init_genrand(19_650_218);
        rng.init_by_array(&key);
        rng
    }

    fn init_genrand(s: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = s;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: N }
    }

    fn init_by_array(&mut self, key: &[u32]) {
        let mt = &mut self.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = mt[i - 1];
            mt[i] = (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = mt[i - 1];
            mt[i] =
                (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        self.index = N;
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        for k in 0..N {
            let y = (mt[k] & 0x8000_0000) | (mt[(k + 1) % N] & 0x7fff_ffff);
            let mut next = mt[(k + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            mt[k] = next;
        }
        self.index = 0;
    }

    /// `genrand_uint32`: the next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for 1 <= k <= 32.
    fn getrandbits(&mut self, k: u32) -> u32 {
        debug_assert!((1..=32).contains(&k));
        self.next_u32() >> (32 - k)
    }

    /// `_randbelow(n)`: uniform in `0..n` by rejection, as CPython does it.
    pub fn randbelow(&mut self, n: usize) -> usize {
        if n <= 1 {
            // CPython draws getrandbits(1) for n == 1 (and returns 0 without drawing for 0).
            if n == 1 {
                self.getrandbits(1);
            }
            return 0;
        }
        assert!(
            n <= u32::MAX as usize,
            "randbelow: n above 2^32 is not needed here"
        );
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random.shuffle(x)`.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i + 1);
            x.swap(i, j);
        }
    }

    /// The index `random.choice(seq)` would pick from a sequence of `len` items.
    pub fn choice_index(&mut self, len: usize) -> usize {
        self.randbelow(len)
    }

    /// `random.random()`: 53-bit float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by CPython 3.11:
    //   import random; r = random.Random(0); [r.getrandbits(32) for _ in range(3)]
    //   r = random.Random(0); x = list(range(20)); r.shuffle(x); x
    //   r = random.Random(12345); r.random()
    #[test]
    fn matches_cpython_words() {
        let mut r = PyRandom::new(0);
        let got: Vec<u32> = (0..3).map(|_| r.next_u32()).collect();
        assert_eq!(got, CPYTHON_SEED0_WORDS);
    }

    #[test]
    fn matches_cpython_shuffle() {
        let mut r = PyRandom::new(0);
        let mut x: Vec<usize> = (0..20).collect();
        r.shuffle(&mut x);
        assert_eq!(x, CPYTHON_SEED0_SHUFFLE20);
    }

    #[test]
    fn matches_cpython_random_and_large_seed() {
        let mut r = PyRandom::new(12345);
        assert_eq!(r.random(), CPYTHON_SEED12345_RANDOM);
        let mut r = PyRandom::new(1 << 40 | 7);
        assert_eq!(r.next_u32(), CPYTHON_SEED_2POW40_PLUS7_WORD);
    }

    const CPYTHON_SEED0_WORDS: [u32; 3] = [3_626_764_237, 1_654_615_998, 3_255_389_356];
    const CPYTHON_SEED0_SHUFFLE20: [usize; 20] = [
        10, 18, 16, 14, 0, 17, 11, 2, 3, 9, 5, 7, 4, 19, 6, 15, 8, 1, 13, 12,
    ];
    const CPYTHON_SEED12345_RANDOM: f64 = 0.416_619_872_545_341_16;
    const CPYTHON_SEED_2POW40_PLUS7_WORD: u32 = 2_635_837_658;
}
