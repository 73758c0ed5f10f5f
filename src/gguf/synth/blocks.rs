//! Random but valid tensor data: quant blocks whose scale fields are finite
//! f16 values chosen so every weight has a target standard deviation, and
//! plain float tensors drawn directly.
//!
//! Each quantized block is random bytes with its scale (and min) fields
//! overwritten; the sub-block scales of K-quants are fixed at 8. The scale `d`
//! is `std / QUANT_STD`, where `QUANT_STD` is the standard deviation of the
//! integer multiplier `d` is applied to when the quant bytes are uniform.

use std::io::Write;

use crate::gguf::GgmlType;
use crate::util::rng::Rng;

/// The types `hypura gen` can fill with valid random blocks.
pub const SUPPORTED: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
];

/// What a tensor's values should look like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Norm weights: `1.0 ± noise` (uniform).
    Ones {
        /// Half-width of the noise.
        noise: f32,
    },
    /// Zero-mean values with this standard deviation.
    Random {
        /// Target standard deviation of each element.
        std: f32,
    },
}

/// The fixed K-quant sub-block scale (and min) multiplier.
const K_SUB_SCALE: f32 = 8.0;

/// `sqrt((n² - 1) / 12)`: standard deviation of a uniform integer on `0..n`.
fn uniform_int_std(n: f32) -> f32 {
    ((n * n - 1.0) / 12.0).sqrt()
}

/// Standard deviation of the integer multiplier of the block scale, for
/// uniformly random quant bytes; `None` for types without a block encoder.
fn quant_std(t: GgmlType) -> Option<f32> {
    Some(match t {
        GgmlType::Q8_0 => uniform_int_std(256.0),
        GgmlType::Q4_0 | GgmlType::Q4_1 => uniform_int_std(16.0),
        GgmlType::Q5_0 | GgmlType::Q5_1 => uniform_int_std(32.0),
        GgmlType::Q2_K => K_SUB_SCALE * uniform_int_std(4.0),
        GgmlType::Q4_K => K_SUB_SCALE * uniform_int_std(16.0),
        GgmlType::Q5_K => K_SUB_SCALE * uniform_int_std(32.0),
        GgmlType::Q6_K => K_SUB_SCALE * uniform_int_std(64.0),
        // The 16 kvalues_iq4nl (-127..=113) have a standard deviation of about 67.
        GgmlType::IQ4_NL => 67.0,
        _ => return None,
    })
}

/// IEEE half precision from `x`, rounding to nearest even (subnormals kept,
/// overflow to infinity).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let (full, shift) = if e <= 0 {
        (mant | 0x80_0000, (14 - e) as u32)
    } else {
        (mant, 13)
    };
    if shift > 24 {
        return sign;
    }
    let mut m = full >> shift;
    let rem = full & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rem > half || (rem == half && m & 1 == 1) {
        m += 1;
    }
    // Carries out of the mantissa land in the exponent, which is what rounding up means.
    let base = if e <= 0 { 0 } else { (e as u32) << 10 };
    sign | (base + m) as u16
}

/// `f32` from IEEE half precision bits.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let mant = f32::from(h & 0x3ff);
    match exp {
        0 => sign * mant * 2f32.powi(-24),
        0x1f if mant == 0.0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        _ => sign * (1.0 + mant / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// bfloat16 from `x`, rounding to nearest even.
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// Writes `n_elements` values of type `t` following `init` to `out`, in
/// chunks of whole blocks (never the whole tensor at once).
pub fn write_tensor_data(
    t: GgmlType,
    n_elements: u64,
    init: Init,
    rng: &mut Rng,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let block = t.block_size();
    let block_bytes = t.type_size() as usize;
    let n_blocks = n_elements / block;
    let per_chunk = ((1usize << 20) / block_bytes).max(1) as u64;
    let mut buf = Vec::with_capacity(per_chunk as usize * block_bytes);
    let mut done = 0u64;
    while done < n_blocks {
        let n = per_chunk.min(n_blocks - done);
        buf.clear();
        buf.resize(n as usize * block_bytes, 0);
        for b in buf.chunks_exact_mut(block_bytes) {
            encode_block(t, init, rng, b)?;
        }
        out.write_all(&buf)?;
        done += n;
    }
    Ok(())
}

/// Fills one block (`buf.len() == t.type_size()`).
fn encode_block(t: GgmlType, init: Init, rng: &mut Rng, buf: &mut [u8]) -> std::io::Result<()> {
    match t {
        GgmlType::F32 => fill_floats(buf, 4, init, rng, |x, s| {
            s.copy_from_slice(&x.to_le_bytes())
        }),
        GgmlType::F16 => fill_floats(buf, 2, init, rng, |x, s| {
            s.copy_from_slice(&f32_to_f16(x).to_le_bytes())
        }),
        GgmlType::BF16 => fill_floats(buf, 2, init, rng, |x, s| {
            s.copy_from_slice(&f32_to_bf16(x).to_le_bytes())
        }),
        _ => {
            let std = match init {
                Init::Random { std } => std,
                // Quantized norms are not a thing llama.cpp produces; approximate with noise.
                Init::Ones { noise } => noise,
            };
            let q = quant_std(t).ok_or_else(|| unsupported(t))?;
            rng.fill_bytes(buf);
            set_scales(t, std / q, buf);
        }
    }
    Ok(())
}

fn unsupported(t: GgmlType) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("cannot generate {t} data"),
    )
}

/// Fills a block of plain floats of `width` bytes each; `enc` stores one value.
fn fill_floats(
    buf: &mut [u8],
    width: usize,
    init: Init,
    rng: &mut Rng,
    enc: impl Fn(f32, &mut [u8]),
) {
    for slot in buf.chunks_exact_mut(width) {
        let x = match init {
            Init::Ones { noise } => 1.0 + noise * (rng.next_f32() * 2.0 - 1.0),
            Init::Random { std } => std * rng.unit_uniform(),
        };
        enc(x, slot);
    }
}

fn put_f16(buf: &mut [u8], at: usize, x: f32) {
    buf[at..at + 2].copy_from_slice(&f32_to_f16(x).to_le_bytes());
}

/// The block's scale `d` as stored (f16-rounded), so mins can match it exactly.
fn stored(d: f32) -> f32 {
    f16_to_f32(f32_to_f16(d))
}

/// Overwrites the scale fields of a random block so it dequantizes to values
/// with mean about 0 and standard deviation `d * quant_std(t)`. Layouts follow
/// `ggml-common.h`.
fn set_scales(t: GgmlType, d: f32, buf: &mut [u8]) {
    /// K-quant packed 6-bit scales and mins, all equal to 8 (`get_scale_min_k4`).
    const K_SCALES: [u8; 12] = [8, 8, 8, 8, 8, 8, 8, 8, 0x88, 0x88, 0x88, 0x88];
    let d = stored(d);
    match t {
        GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0 | GgmlType::IQ4_NL => put_f16(buf, 0, d),
        GgmlType::Q4_1 => {
            put_f16(buf, 0, d);
            put_f16(buf, 2, -7.5 * d);
        }
        GgmlType::Q5_1 => {
            put_f16(buf, 0, d);
            put_f16(buf, 2, -15.5 * d);
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let mean_q = if t == GgmlType::Q4_K { 7.5 } else { 15.5 };
            put_f16(buf, 0, d);
            put_f16(buf, 2, mean_q * d);
            buf[4..16].copy_from_slice(&K_SCALES);
        }
        GgmlType::Q6_K => {
            buf[192..208].fill(K_SUB_SCALE as u8);
            put_f16(buf, 208, d);
        }
        GgmlType::Q2_K => {
            buf[0..16].fill(0x88);
            put_f16(buf, 80, d);
            put_f16(buf, 82, 1.5 * d);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        for (x, h) in [
            (1.0f32, 0x3c00u16),
            (0.5, 0x3800),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (1e6, 0x7c00),
        ] {
            assert_eq!(f32_to_f16(x), h, "{x}");
        }
        assert_eq!(f32_to_f16(6.103_515_6e-5), 0x0400);
        assert_eq!(f32_to_f16(5.960_464_5e-8), 0x0001);
        assert_eq!(f32_to_f16(1e-9), 0);
        for h in [0x0001u16, 0x0234, 0x03ff, 0x0400, 0x3c01, 0x7bff, 0xbc00] {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h);
        }
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
    }

    #[test]
    fn q8_0_blocks_have_the_target_std() {
        let mut rng = Rng::new(3);
        let mut data = Vec::new();
        write_tensor_data(
            GgmlType::Q8_0,
            32 * 1000,
            Init::Random { std: 0.02 },
            &mut rng,
            &mut data,
        )
        .unwrap();
        assert_eq!(data.len(), 34 * 1000);
        let mut sum_sq = 0f64;
        for block in data.chunks_exact(34) {
            let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
            assert!(d.is_finite() && d > 0.0);
            sum_sq += block[2..]
                .iter()
                .map(|&q| (f64::from(q as i8) * f64::from(d)).powi(2))
                .sum::<f64>();
        }
        let std = (sum_sq / 32000.0).sqrt();
        assert!((std - 0.02).abs() < 0.002, "std {std}");
    }

    #[test]
    fn every_supported_type_writes_whole_blocks() {
        for t in SUPPORTED {
            let mut rng = Rng::new(1);
            let mut data = Vec::new();
            let n = t.block_size() * 3;
            write_tensor_data(t, n, Init::Random { std: 0.01 }, &mut rng, &mut data).unwrap();
            assert_eq!(data.len() as u64, t.tensor_size(&[n]).unwrap(), "{t}");
        }
    }
}
