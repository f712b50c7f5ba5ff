//! Synthetic models with the layer shapes of real ones (random bytes): what
//! the transfer benchmark, the residency tests and the switch tests store.

use crate::error::Result;
pub use crate::measure::fill_random;
use crate::store::{Dtype, LayerSpec, ModelSpec, Store, TensorSpec};

/// A model shape: (layer name, [(tensor name, dtype, shape)]).
pub type Shape = Vec<(String, Vec<(String, Dtype, Vec<u64>)>)>;

fn layer(name: &str, tensors: &[(&str, Dtype, &[u64])]) -> (String, Vec<(String, Dtype, Vec<u64>)>) {
    (
        name.to_string(),
        tensors.iter().map(|(t, d, s)| (format!("{name}.{t}"), *d, s.to_vec())).collect(),
    )
}

/// GPT-2 medium's parameters (HF naming): 24 blocks, d = 1024, 355M fp32.
pub fn gpt2_medium_shape() -> Shape {
    let f = Dtype::F32;
    let d = 1024u64;
    let mut s = vec![layer("wte", &[("weight", f, &[50257, d])]), layer("wpe", &[("weight", f, &[1024, d])])];
    for i in 0..24 {
        let h = format!("h.{i}");
        s.push(layer(&format!("{h}.ln_1"), &[("weight", f, &[d]), ("bias", f, &[d])]));
        s.push(layer(&format!("{h}.attn.c_attn"), &[("weight", f, &[d, 3 * d]), ("bias", f, &[3 * d])]));
        s.push(layer(&format!("{h}.attn.c_proj"), &[("weight", f, &[d, d]), ("bias", f, &[d])]));
        s.push(layer(&format!("{h}.ln_2"), &[("weight", f, &[d]), ("bias", f, &[d])]));
        s.push(layer(&format!("{h}.mlp.c_fc"), &[("weight", f, &[d, 4 * d]), ("bias", f, &[4 * d])]));
        s.push(layer(&format!("{h}.mlp.c_proj"), &[("weight", f, &[4 * d, d]), ("bias", f, &[d])]));
    }
    s.push(layer("ln_f", &[("weight", f, &[d]), ("bias", f, &[d])]));
    s
}

/// ResNet-152's parameters and buffers (torchvision naming): conv weights and
/// batch norms (weight, bias, running mean and var, num_batches_tracked).
pub fn resnet152_shape() -> Shape {
    let f = Dtype::F32;
    let bn = |name: &str, c: u64| {
        layer(
            name,
            &[
                ("weight", f, &[c]),
                ("bias", f, &[c]),
                ("running_mean", f, &[c]),
                ("running_var", f, &[c]),
                ("num_batches_tracked", Dtype::I64, &[]),
            ],
        )
    };
    let conv = |name: &str, o: u64, i: u64, k: u64| layer(name, &[("weight", f, &[o, i, k, k])]);
    let mut s = vec![conv("conv1", 64, 3, 7), bn("bn1", 64)];
    let mut inplanes = 64u64;
    for (stage, (blocks, planes)) in [(3u64, 64u64), (8, 128), (36, 256), (3, 512)].into_iter().enumerate() {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", stage + 1);
            s.push(conv(&format!("{p}.conv1"), planes, inplanes, 1));
            s.push(bn(&format!("{p}.bn1"), planes));
            s.push(conv(&format!("{p}.conv2"), planes, planes, 3));
            s.push(bn(&format!("{p}.bn2"), planes));
            s.push(conv(&format!("{p}.conv3"), planes * 4, planes, 1));
            s.push(bn(&format!("{p}.bn3"), planes * 4));
            if b == 0 {
                s.push(conv(&format!("{p}.downsample.0"), planes * 4, inplanes, 1));
                s.push(bn(&format!("{p}.downsample.1"), planes * 4));
            }
            inplanes = planes * 4;
        }
    }
    s.push(layer("fc", &[("weight", f, &[1000, 2048]), ("bias", f, &[1000])]));
    s
}

/// Total bytes and tensor count of a shape.
pub fn shape_size(shape: &Shape) -> Result<(u64, usize)> {
    let mut bytes = 0u64;
    let mut n = 0usize;
    for (_, ts) in shape {
        for (_, d, s) in ts {
            bytes += crate::store::model::tensor_bytes(*d, s)?;
            n += 1;
        }
    }
    Ok((bytes, n))
}


/// Adds a model of `shape` with random bytes to `store`.
pub fn add_synthetic(store: &Store, name: &str, shape: &Shape, seed: u64, progress: crate::store::Progress<'_>) -> Result<()> {
    let (bytes, _) = shape_size(shape)?;
    let mut data = vec![0u8; bytes as usize];
    fill_random(&mut data, seed);
    let mut spec = ModelSpec::default();
    let mut pos = 0usize;
    for (lname, ts) in shape {
        let mut tensors = Vec::new();
        for (tname, d, s) in ts {
            let n = crate::store::model::tensor_bytes(*d, s)? as usize;
            tensors.push(TensorSpec { name: tname.clone(), dtype: *d, shape: s.clone(), data: &data[pos..pos + n] });
            pos += n;
        }
        spec.layers.push(LayerSpec { name: lname.clone(), tensors });
    }
    store.add_model(name, &spec, progress)?;
    Ok(())
}
