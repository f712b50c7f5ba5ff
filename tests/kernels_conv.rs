//! GPU tests of the conv kernels (src/kernels/conv.rs, kernels/conv.ptx):
//! `cargo test --test kernels_conv -- --ignored` on a machine with a CUDA GPU.
//! Each compares the kernel's output with the f64 CPU reference by
//! ‖out − ref‖₂ / ‖ref‖₂ ≤ 1e-5 (exact fp32), on random inputs, with the
//! output poisoned (0xFF bytes = NaN) before every launch so that an
//! unwritten element fails.

use pipeswitch::cuda::module::check_launch;
use pipeswitch::cuda::{Device, DeviceAlloc, Stream};
use pipeswitch::error::Error;
use pipeswitch::kernels::conv::{self, Conv2dArgs, ConvTile, Pool2dArgs};

const TOL: f64 = 1e-5;

fn dev() -> &'static Device {
    Device::get(0).expect("a CUDA device")
}

fn upload(d: &'static Device, v: &[f32]) -> DeviceAlloc {
    DeviceAlloc::from_slice(d, v).expect("upload")
}

/// A device buffer of `len` floats (at least one), every byte 0xFF (NaN).
fn poisoned(d: &'static Device, len: usize) -> DeviceAlloc {
    let a = DeviceAlloc::new(d, 4 * len.max(1)).expect("alloc");
    a.fill(0xFF).expect("poison");
    a
}

fn download(a: &DeviceAlloc, len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    a.copy_to_slice(&mut v).expect("download");
    v
}

/// ‖out − ref‖₂ / ‖ref‖₂, or infinity when out holds a NaN (ref never does).
fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len());
    if let Some(i) = out.iter().position(|v| v.is_nan()) {
        eprintln!("NaN at element {i} of {}", out.len());
        return f64::INFINITY;
    }
    let num: f64 = out.iter().zip(reference).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum();
    let den: f64 = reference.iter().map(|b| f64::from(*b).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// (name, shape with stride/padding set) of every convolution the tests run.
fn conv_shapes() -> Vec<(&'static str, Conv2dArgs)> {
    let mut v = vec![
        ("stem 7x7 s2 p3 3->64 on 37x29", Conv2dArgs::shape(2, 3, 37, 29, 64, 7, 7, 2, 3)),
        ("1x1 s1 67->130 14x14 (PQ % 4 == 0)", Conv2dArgs::shape(3, 67, 14, 14, 130, 1, 1, 1, 0)),
        ("1x1 s1 64->96 7x7 (PQ % 4 != 0)", Conv2dArgs::shape(3, 64, 7, 7, 96, 1, 1, 1, 0)),
        ("1x1 s2 64->128 15x15 (downsample)", Conv2dArgs::shape(2, 64, 15, 15, 128, 1, 1, 2, 0)),
        ("3x3 s1 p1 67->130 13x11", Conv2dArgs::shape(3, 67, 13, 11, 130, 3, 3, 1, 1)),
        ("3x3 s2 p1 32->64 28x28", Conv2dArgs::shape(1, 32, 28, 28, 64, 3, 3, 2, 1)),
        ("3x3 p1 3->5 9x7", Conv2dArgs::shape(1, 3, 9, 7, 5, 3, 3, 1, 1)),
        ("5x5 s3 p2 16->33 17x23", Conv2dArgs::shape(1, 16, 17, 23, 33, 5, 5, 3, 2)),
        ("1x1 1->1 1x1", Conv2dArgs::shape(1, 1, 1, 1, 1, 1, 1, 1, 0)),
        ("3x3 p0 512->70 3x3 (one pixel, crs 4608)", Conv2dArgs::shape(1, 512, 3, 3, 70, 3, 3, 1, 0)),
        ("3x3 s1 p1 256->256 14x14 N=2", Conv2dArgs::shape(2, 256, 14, 14, 256, 3, 3, 1, 1)),
        ("1x1 s1 131->257 16x16 N=1 (odd channels)", Conv2dArgs::shape(1, 131, 16, 16, 257, 1, 1, 1, 0)),
        ("3x3 p2 (pad > filter/2) 4->6 5x5", Conv2dArgs::shape(2, 4, 5, 5, 6, 3, 3, 1, 2)),
    ];
    // Non-square filter, stride and padding.
    let mut a = Conv2dArgs::shape(2, 5, 10, 9, 7, 1, 3, 1, 0);
    a.stride_h = 2;
    a.pad_w = 1;
    v.push(("1x3 stride (2,1) pad (0,1) 5->7 10x9", a));
    let mut a = Conv2dArgs::shape(3, 6, 12, 17, 9, 4, 2, 1, 0);
    a.stride_w = 3;
    a.pad_h = 2;
    a.pad_w = 1;
    v.push(("4x2 stride (1,3) pad (2,1) 6->9 12x17", a));
    v
}

/// Runs one convolution on the GPU with each tile (and the automatic
/// choice) and checks each result against the reference. `epilogue` says
/// which of (bias, residual, relu) to use.
fn check_conv(d: &'static Device, stream: &Stream, name: &str, shape: &Conv2dArgs, epilogue: (bool, bool, bool), seed: u64) {
    let (bias, residual, relu) = epilogue;
    let x = conv::random_f32(shape.x_len(), seed);
    let w = conv::random_f32(shape.weight_len(), seed + 1);
    let b = conv::random_f32(shape.k, seed + 2);
    let r = conv::random_f32(shape.y_len(), seed + 3);
    let mut shape = *shape;
    shape.relu = relu;
    let reference = conv::conv2d_ref(&shape, &x, &w, bias.then_some(b.as_slice()), residual.then_some(r.as_slice())).unwrap();
    let (xd, wd, bd, rd) = (upload(d, &x), upload(d, &w), upload(d, &b), upload(d, &r));
    let y = poisoned(d, shape.y_len());
    let args = Conv2dArgs {
        x: xd.ptr(),
        weight: wd.ptr(),
        bias: if bias { bd.ptr() } else { 0 },
        residual: if residual { rd.ptr() } else { 0 },
        y: y.ptr(),
        ..shape
    };
    let mut runs: Vec<Option<ConvTile>> = ConvTile::ALL.iter().copied().map(Some).collect();
    runs.push(None);
    for tile in runs {
        y.fill(0xFF).unwrap();
        match tile {
            Some(t) => conv::conv2d_with(d, stream.raw(), &args, t).unwrap(),
            None => conv::conv2d(d, stream.raw(), &args).unwrap(),
        }
        check_launch(stream.raw()).unwrap();
        let out = download(&y, shape.y_len());
        let err = rel_err(&out, &reference);
        assert!(
            err <= TOL,
            "{name} tile {tile:?} bias={bias} residual={residual} relu={relu}: rel err {err:.3e}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv2d_matches_reference() {
    let d = dev();
    let stream = Stream::new(d).unwrap();
    let combos = [(false, false, false), (true, false, true), (true, true, true), (false, true, false)];
    for (i, (name, shape)) in conv_shapes().iter().enumerate() {
        for (j, &(bias, residual, relu)) in combos.iter().enumerate() {
            check_conv(d, &stream, name, shape, (bias, residual, relu), 100 * i as u64 + 10 * j as u64);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv2d_resnet_layer_shapes_match_reference() {
    // Full-size channel counts of ResNet-152 at batch 1 (the CPU reference
    // bounds the size): stem on a reduced image, every kind of bottleneck conv.
    let d = dev();
    let stream = Stream::new(d).unwrap();
    let shapes = [
        ("stem 3->64 7x7 s2 on 64x48", Conv2dArgs::shape(1, 3, 64, 48, 64, 7, 7, 2, 3)),
        ("layer1 1x1 256->64 56x56", Conv2dArgs::shape(1, 256, 56, 56, 64, 1, 1, 1, 0)),
        ("layer2.0 3x3 128 s2 56x56", Conv2dArgs::shape(1, 128, 56, 56, 128, 3, 3, 2, 1)),
        ("layer3 1x1 256->1024 14x14", Conv2dArgs::shape(1, 256, 14, 14, 1024, 1, 1, 1, 0)),
        ("layer4.0 downsample 1024->2048 s2 14x14", Conv2dArgs::shape(1, 1024, 14, 14, 2048, 1, 1, 2, 0)),
        ("layer4 3x3 512 7x7", Conv2dArgs::shape(1, 512, 7, 7, 512, 3, 3, 1, 1)),
    ];
    for (i, (name, shape)) in shapes.iter().enumerate() {
        check_conv(d, &stream, name, shape, (true, i % 2 == 1, true), 5000 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv2d_residual_in_place_and_unaligned_output() {
    let d = dev();
    let stream = Stream::new(d).unwrap();
    // PQ % 4 == 0, so the aligned launch takes 16-byte stores; the second
    // one's y is 4 bytes into its allocation and must take scalar stores.
    let shape = Conv2dArgs::shape(2, 19, 8, 8, 37, 3, 3, 1, 1);
    let x = conv::random_f32(shape.x_len(), 71);
    let w = conv::random_f32(shape.weight_len(), 72);
    let b = conv::random_f32(shape.k, 73);
    let r = conv::random_f32(shape.y_len(), 74);
    let mut s = shape;
    s.relu = true;
    let reference = conv::conv2d_ref(&s, &x, &w, Some(&b), Some(&r)).unwrap();
    let (xd, wd, bd) = (upload(d, &x), upload(d, &w), upload(d, &b));
    for offset in [0u64, 4] {
        for tile in ConvTile::ALL {
            // In place: y holds the residual on entry.
            let mut yr = vec![0f32; shape.y_len() + 1];
            yr[offset as usize / 4..][..shape.y_len()].copy_from_slice(&r);
            let y = upload(d, &yr);
            let yp = y.ptr() + offset;
            let args = Conv2dArgs { x: xd.ptr(), weight: wd.ptr(), bias: bd.ptr(), residual: yp, y: yp, ..s };
            conv::conv2d_with(d, stream.raw(), &args, tile).unwrap();
            check_launch(stream.raw()).unwrap();
            let all = download(&y, shape.y_len() + 1);
            let out = &all[offset as usize / 4..][..shape.y_len()];
            let err = rel_err(out, &reference);
            assert!(err <= TOL, "in place, offset {offset}, {tile:?}: rel err {err:.3e}");
            // Separate residual, unaligned y, poisoned.
            let rd = upload(d, &r);
            let y2 = poisoned(d, shape.y_len() + 1);
            let args = Conv2dArgs { residual: rd.ptr(), y: y2.ptr() + offset, ..args };
            conv::conv2d_with(d, stream.raw(), &args, tile).unwrap();
            check_launch(stream.raw()).unwrap();
            let all = download(&y2, shape.y_len() + 1);
            let err = rel_err(&all[offset as usize / 4..][..shape.y_len()], &reference);
            assert!(err <= TOL, "offset {offset}, {tile:?}: rel err {err:.3e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv2d_rejects_bad_arguments() {
    let d = dev();
    let stream = Stream::new(d).unwrap();
    let shape = Conv2dArgs::shape(1, 4, 6, 6, 8, 3, 3, 1, 1);
    let x = upload(d, &conv::random_f32(shape.x_len(), 1));
    let w = upload(d, &conv::random_f32(shape.weight_len(), 2));
    let y = poisoned(d, shape.y_len());
    let good = Conv2dArgs { x: x.ptr(), weight: w.ptr(), y: y.ptr(), ..shape };
    conv::conv2d(d, stream.raw(), &good).unwrap();
    check_launch(stream.raw()).unwrap();
    let bad = [
        Conv2dArgs { k: 0, ..good },
        Conv2dArgs { r: 9, ..good },
        Conv2dArgs { y: 0, ..good },
        Conv2dArgs { y: y.ptr() + 2, ..good },
        Conv2dArgs { y: x.ptr(), ..good },
        Conv2dArgs { stride_h: 0, ..good },
    ];
    for a in bad {
        assert!(matches!(conv::conv2d(d, stream.raw(), &a), Err(Error::InvalidArgument(_))), "{a:?}");
    }
}

fn pool_shapes() -> Vec<(&'static str, Pool2dArgs)> {
    vec![
        ("resnet maxpool 3x3 s2 p1 on 2x64x112x112", Pool2dArgs::square(2, 64, 112, 112, 3, 2, 1)),
        ("3x3 s2 p1 on 3x5x17x13", Pool2dArgs::square(3, 5, 17, 13, 3, 2, 1)),
        ("2x2 s2 on 1x3x9x7", Pool2dArgs::square(1, 3, 9, 7, 2, 2, 0)),
        ("7x7 s1 p3 on 2x2x9x9", Pool2dArgs::square(2, 2, 9, 9, 7, 1, 3)),
        ("7x7 s1 on 8x3x7x7 (one output)", Pool2dArgs::square(8, 3, 7, 7, 7, 1, 0)),
        ("1x1 s1 on 1x1x1x1", Pool2dArgs::square(1, 1, 1, 1, 1, 1, 0)),
        (
            "3x2 stride (1,2) pad (1,1) on 2x3x11x10",
            Pool2dArgs { n: 2, c: 3, h: 11, w: 10, kernel_h: 3, kernel_w: 2, stride_h: 1, stride_w: 2, pad_h: 1, pad_w: 1 },
        ),
    ]
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pools_match_reference() {
    let d = dev();
    let stream = Stream::new(d).unwrap();
    for (i, (name, a)) in pool_shapes().iter().enumerate() {
        let (p, q) = a.out_dims();
        let len = a.n * a.c * p * q;
        let x = conv::random_f32(a.n * a.c * a.h * a.w, 900 + i as u64);
        let xd = upload(d, &x);
        let y = poisoned(d, len);
        conv::max_pool2d(d, stream.raw(), xd.ptr(), y.ptr(), a).unwrap();
        check_launch(stream.raw()).unwrap();
        let out = download(&y, len);
        let reference = conv::max_pool2d_ref(a, &x).unwrap();
        assert_eq!(out, reference, "max pool {name}"); // a max is exact
        y.fill(0xFF).unwrap();
        conv::avg_pool2d(d, stream.raw(), xd.ptr(), y.ptr(), a).unwrap();
        check_launch(stream.raw()).unwrap();
        let out = download(&y, len);
        let err = rel_err(&out, &conv::avg_pool2d_ref(a, &x).unwrap());
        assert!(err <= TOL, "avg pool {name}: rel err {err:.3e}");
    }
    // NaN propagates through max pool; padding never wins over negatives.
    let a = Pool2dArgs::square(1, 1, 4, 4, 3, 1, 1);
    let mut x: Vec<f32> = (0..16).map(|v| -1.0 - v as f32).collect();
    x[0] = f32::NAN;
    let xd = upload(d, &x);
    let y = poisoned(d, 16);
    conv::max_pool2d(d, stream.raw(), xd.ptr(), y.ptr(), &a).unwrap();
    check_launch(stream.raw()).unwrap();
    let out = download(&y, 16);
    let reference = conv::max_pool2d_ref(&a, &x).unwrap();
    for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
        assert!(o.is_nan() == r.is_nan() && (r.is_nan() || o == r), "element {i}: {o} vs {r}");
    }
    assert!(out[0].is_nan() && out[5].is_nan() && !out[2].is_nan());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn global_avg_pool_matches_reference() {
    let d = dev();
    let stream = Stream::new(d).unwrap();
    for (i, &(n, c, h, w)) in [(8usize, 2048usize, 7usize, 7usize), (3, 5, 1, 1), (2, 3, 17, 13), (1, 9, 64, 64), (1, 1, 1, 33)].iter().enumerate() {
        let x = conv::random_f32(n * c * h * w, 700 + i as u64);
        let xd = upload(d, &x);
        let y = poisoned(d, n * c);
        conv::global_avg_pool(d, stream.raw(), xd.ptr(), y.ptr(), n, c, h, w).unwrap();
        check_launch(stream.raw()).unwrap();
        let out = download(&y, n * c);
        let err = rel_err(&out, &conv::global_avg_pool_ref(&x, n, c, h, w).unwrap());
        assert!(err <= TOL, "global avg pool {n}x{c}x{h}x{w}: rel err {err:.3e}");
    }
}
