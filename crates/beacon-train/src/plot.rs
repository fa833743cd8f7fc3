//! The loss-curve PNG: training loss (raw and smoothed) and held-out loss against the step.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans-LICENSE.txt at the repository root), so
/// labels render on a machine without fonts.
static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Exponential moving average with the bias correction of a zero start.
pub fn smooth(values: &[f64], alpha: f64) -> Vec<f64> {
    let mut ema = 0.0;
    let mut weight = 0.0;
    values
        .iter()
        .map(|&v| {
            ema = alpha * ema + (1.0 - alpha) * v;
            weight = alpha * weight + (1.0 - alpha);
            ema / weight
        })
        .collect()
}

/// Draw `train` (step, loss) and `heldout` (step, loss) into `path` (PNG, 1000×560).
pub fn loss_curve(
    path: &Path,
    title: &str,
    train: &[(f64, f64)],
    heldout: &[(f64, f64)],
) -> Result<()> {
    register_font();
    if train.is_empty() && heldout.is_empty() {
        return Ok(());
    }
    let all = train.iter().chain(heldout);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    if !(y_min.is_finite() && y_max.is_finite()) {
        return Ok(());
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    y_min -= pad;
    y_max += pad;
    // The encoder picks the format from the extension, so the temporary file ends in .png too.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "loss.png".into());
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, (1000, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, y_min..y_max)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (nats / token)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        let raw_color = RGBColor(170, 190, 230);
        chart
            .draw_series(LineSeries::new(train.iter().copied(), raw_color))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label("train (per step)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw_color));
        let ys: Vec<f64> = train.iter().map(|p| p.1).collect();
        let sm: Vec<(f64, f64)> = train.iter().map(|p| p.0).zip(smooth(&ys, 0.9)).collect();
        chart
            .draw_series(LineSeries::new(sm, BLUE.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label("train (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !heldout.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    heldout.iter().copied(),
                    RED.stroke_width(2),
                ))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label("held-out")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .draw_series(heldout.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
