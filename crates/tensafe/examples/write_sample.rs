//! Writes a small deterministic checkpoint: `cargo run --example write_sample -- OUT.safetensors`.
//!
//! The README's main job uses it to produce a file to inspect and verify.

use tensafe::{Dtype, Metadata, RawTensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "sample.safetensors".into());
    // A tiny two-layer MLP with a deterministic pattern of weights.
    let f32_bytes = |n: usize, scale: f32| -> Vec<u8> {
        (0..n).flat_map(|i| ((i as f32 * 0.37).sin() * scale).to_le_bytes()).collect()
    };
    let w1 = f32_bytes(16 * 8, 0.5);
    let b1 = f32_bytes(16, 0.1);
    let w2: Vec<u8> = (0..4 * 16).flat_map(|i| half_bits(i as f32 / 64.0).to_le_bytes()).collect();
    let steps = 1234i64.to_le_bytes();
    let mask = [1u8, 0, 1, 1];
    let tensors = [
        ("layer1.weight", RawTensor { dtype: Dtype::F32, shape: &[16, 8], data: &w1 }),
        ("layer1.bias", RawTensor { dtype: Dtype::F32, shape: &[16], data: &b1 }),
        ("layer2.weight", RawTensor { dtype: Dtype::BF16, shape: &[4, 16], data: &w2 }),
        ("step", RawTensor { dtype: Dtype::I64, shape: &[], data: &steps }),
        ("mask", RawTensor { dtype: Dtype::Bool, shape: &[4], data: &mask }),
    ];
    let metadata = Metadata::from([("format".to_string(), "pt".to_string())]);
    tensafe::serialize_to_file(tensors, Some(&metadata), &out)?;
    println!("wrote {out}");
    Ok(())
}

/// bfloat16 bits of `x` (truncating; good enough for sample data).
fn half_bits(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}
