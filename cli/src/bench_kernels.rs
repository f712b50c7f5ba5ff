//! `pipeswitch bench kernels`: how fast the hand-written kernels run at the
//! shapes the demo uses. Not a pass/fail check (correctness lives in the
//! GPU tests, `tests/kernels_*.rs`): it prints every ResNet-152 convolution
//! shape at batch 8 with each tile and with the automatic choice, the summed
//! time of all the network's convolutions, and the attention, layer norm,
//! bias + GELU and softmax kernels at BERT-base's and GPT-2 medium's demo
//! shapes (batch 8, 128 tokens). Medians of `reps` timed launches.

use pipeswitch::cuda::{Device, DeviceAlloc, Event, Stream};
use pipeswitch::error::Result;
use pipeswitch::kernels::attention::attention;
use pipeswitch::kernels::conv::{self, ConvTile};
use pipeswitch::kernels::elementwise::{self as ew, Activation};
use pipeswitch::kernels::norm;

/// Runs the kernel benchmark on `device`, one line at a time into `log`.
pub fn run_kernels(device: i32, reps: usize, log: &mut dyn FnMut(&str)) -> Result<()> {
    let d = Device::get(device)?;
    let reps = reps.max(3);
    log(&format!("device: {} ({reps} timed launches per median)", d.name()?));
    conv_table(d, reps, log)?;
    demo_shapes(d, reps, log)
}

fn conv_table(d: &'static Device, reps: usize, log: &mut dyn FnMut(&str)) -> Result<()> {
    let mut head = format!("{:<44} {:>6}", "ResNet-152 conv (batch 8), TFLOP/s", "count");
    for t in ConvTile::ALL {
        head += &format!(" {:>10}", format!("{t:?}").trim_start_matches('T'));
    }
    log(&format!("{head} {:>10} {:>9}", "auto", "auto ms"));
    let (mut total_ms, mut total_gflop) = (0.0, 0.0);
    for (name, shape, count) in conv::resnet152_convs(8) {
        let mut row = format!("{name:<44} {count:>6}");
        for t in ConvTile::ALL {
            row += &format!(" {:>10.2}", conv::bench_conv_with(d, &shape, Some(t), reps)?);
        }
        let auto = conv::bench_conv(d, &shape, reps)?;
        let ms = shape.flops() / (auto * 1e12) * 1e3;
        total_ms += ms * count as f64;
        total_gflop += shape.flops() * count as f64 / 1e9;
        log(&format!("{row} {auto:>10.2} {ms:>9.3}"));
    }
    log(&format!(
        "all convolutions: {total_gflop:.1} GFLOP in {total_ms:.2} ms = {:.2} TFLOP/s",
        total_gflop / total_ms
    ));
    Ok(())
}

/// Median ms of `reps` launches of `f` on `s`, each between two events, after one warm-up.
fn time_ms(d: &'static Device, s: &Stream, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    s.synchronize()?;
    let (e0, e1) = (Event::new(d, true)?, Event::new(d, true)?);
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        e0.record(s.raw())?;
        f()?;
        e1.record(s.raw())?;
        e1.synchronize()?;
        ms.push(f64::from(Event::elapsed_ms(&e0, &e1)?));
    }
    Ok(pipeswitch::measure::median(&mut ms))
}

fn demo_shapes(d: &'static Device, reps: usize, log: &mut dyn FnMut(&str)) -> Result<()> {
    let s = Stream::new(d)?;
    let (b, seq) = (8usize, 128usize);
    let tokens = b * seq;
    let upload = |len: usize, seed: u64| DeviceAlloc::from_slice(d, &conv::random_f32(len, seed));
    for (name, hidden, heads, causal) in [("bert-base", 768usize, 12usize, false), ("gpt2-medium", 1024, 16, true)] {
        let qkv = upload(tokens * 3 * hidden, 1)?;
        let out = upload(tokens * hidden, 2)?;
        let x = upload(tokens * 4 * hidden, 3)?;
        let r = upload(tokens * hidden, 4)?;
        let g = upload(4 * hidden, 5)?;
        let scores = upload(b * heads * seq * seq, 6)?;
        let sp = s.raw();
        let mut line = |label: String, ms: f64| log(&format!("{name} {label}: {:.1} us", ms * 1e3));
        let ms = time_ms(d, &s, reps, &mut || attention(d, sp, out.ptr(), qkv.ptr(), 0, b, seq, heads, 64, causal))?;
        line(format!("attention [{b} x {heads} heads x {seq}]"), ms);
        let ms = time_ms(d, &s, reps, &mut || {
            norm::add_layernorm(d, sp, out.ptr(), 0, r.ptr(), out.ptr(), g.ptr(), g.ptr(), tokens, hidden, 1e-5)
        })?;
        line(format!("add_layernorm [{tokens}, {hidden}]"), ms);
        let ms = time_ms(d, &s, reps, &mut || {
            ew::bias_act(d, sp, x.ptr(), x.ptr(), g.ptr(), tokens, 4 * hidden, Activation::Gelu)
        })?;
        line(format!("bias+gelu [{tokens}, {}]", 4 * hidden), ms);
        let causal_seq = if causal { seq } else { 0 };
        let ms = time_ms(d, &s, reps, &mut || {
            norm::softmax(d, sp, scores.ptr(), scores.ptr(), b * heads * seq, seq, 0.125, causal_seq)
        })?;
        line(format!("softmax [{}, {seq}]", b * heads * seq), ms);
    }
    Ok(())
}
