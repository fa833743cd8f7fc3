use candle_core::{Device, Module, Tensor};
use std::time::Instant;
fn main() -> beacon::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let loaded = beacon::load(std::path::Path::new(&a[1]), &beacon::LoadOptions::default())?;
    let m = &loaded.model;
    let x = Tensor::randn(0f32, 1.0, (1, 576), &Device::Cpu)?;
    let l = &m.layers[0];
    for (name, lin) in [
        ("q", &l.attn.q_proj),
        ("gate", &l.mlp.gate_proj),
        ("down", &l.mlp.down_proj),
    ] {
        let xin = if name == "down" {
            Tensor::randn(0f32, 1.0, (1, 1536), &Device::Cpu)?
        } else {
            x.clone()
        };
        let t = Instant::now();
        for _ in 0..100 {
            lin.forward(&xin)?;
        }
        println!("{name}: {:.3} ms", t.elapsed().as_secs_f64() * 10.0);
        if let beacon::model::Weight::Quantized { q, .. } = &lin.weight {
            let t = Instant::now();
            for _ in 0..100 {
                q.forward(&xin)?;
            }
            println!(
                "{name} qmatmul direct: {:.3} ms",
                t.elapsed().as_secs_f64() * 10.0
            );
        }
    }
    let t = Instant::now();
    for _ in 0..20 {
        m.lm_head.forward(&x)?;
    }
    println!("lm_head: {:.3} ms", t.elapsed().as_secs_f64() * 50.0);
    let ids = Tensor::new(&[5u32], &Device::Cpu)?;
    let t = Instant::now();
    for _ in 0..100 {
        m.embed_tokens.lookup(&ids)?;
    }
    println!("embed: {:.3} ms", t.elapsed().as_secs_f64() * 10.0);
    Ok(())
}
