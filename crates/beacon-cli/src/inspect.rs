//! `beacon inspect`: what a model is, which beacon settings and weights it will run with.

use crate::common::{load_model, ModelArgs};
use anyhow::Result;

pub fn inspect(args: ModelArgs) -> Result<()> {
    let loaded = load_model(&args)?;
    let c = &loaded.model.cfg;
    println!("model          {}", loaded.path.display());
    println!(
        "architecture   {:?}  layers {}  hidden {}  heads {}/{} kv  head_dim {}  ffn {}",
        c.arch,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size
    );
    println!(
        "vocab          {}  native context {}  rope theta {}  tied lm_head {}",
        c.vocab_size, c.max_position_embeddings, c.rope_theta, c.tie_word_embeddings
    );
    println!(
        "eos ids        {:?}  bos {:?}",
        c.eos_token_ids, c.bos_token_id
    );
    let b = &loaded.beacon;
    println!(
        "beacon         window {}  ratios {:?} ({})  sink {}  raw tail {}  params {:?}  pos {:?}  attn {:?}",
        b.window,
        b.ratios,
        b.ratio_mix.name(),
        b.sink_size,
        b.raw_tail,
        b.params.names(),
        b.pos,
        b.attn
    );
    println!("beacon weights {:?}", loaded.beacon_source);
    let p = &loaded.plan;
    let g = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    println!(
        "memory plan    prefill-weights {}  weights {}  prefill copies {}  temporary {}  K/V {} ({})  scratch ~{}  total {} of {} available ({})",
        p.prefill.name(),
        g(p.weights),
        g(p.copies),
        g(p.temporary),
        g(p.kv),
        p.kv_label,
        g(p.scratch),
        g(p.total()),
        g(p.available.bytes),
        p.available.source
    );
    for (choice, need) in &p.alternatives {
        println!(
            "               {:<10} would need {}",
            choice.name(),
            g(*need)
        );
    }
    println!("bf16 kernel    {}", beacon::model::bf16_kernel_name());
    println!("fingerprint    {}", loaded.fingerprint);
    println!(
        "K/V per token  {} bytes (all layers, f32 K+V)",
        c.num_layers * 2 * c.kv_dim() * 4
    );
    println!(
        "tokenizer      {}",
        if loaded.tokenizer.is_some() {
            "yes"
        } else {
            "none"
        }
    );
    Ok(())
}
