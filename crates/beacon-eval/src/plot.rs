//! PNG plots (plotters, bitmap backend, DejaVu Sans embedded for text).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn fonts() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// A distinct colour per series.
pub fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn bounds(series: &[(String, Vec<(f64, f64)>)], log_y: bool) -> Option<(f64, f64, f64, f64)> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0)).collect();
    if pts.is_empty() {
        return None;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 * 2.0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    Some((x0, x1, y0, y1))
}

/// One line per series; optional log axes and a dashed vertical marker (e.g. the native window).
#[allow(clippy::too_many_arguments)]
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
    log_y: bool,
    marker_x: Option<f64>,
) -> Result<()> {
    fonts();
    let Some((x0, x1, y0, y1)) = bounds(series, log_y) else { return Ok(()) };
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (xa, xb) = if log_x { (x0 / 1.2, x1 * 1.2) } else { (x0, x1) };
    let (ya, yb) = if log_y { (y0 / 1.3, y1 * 1.3) } else { (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)) };
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22)).margin(16).x_label_area_size(44).y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&|v| crate::harness::fmt_len(v.round() as usize))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            if let Some(m) = marker_x.filter(|m| *m >= xa && *m <= xb) {
                chart
                    .draw_series(DashedLineSeries::new(vec![(m, ya), (m, yb)], 6, 4, BLACK.mix(0.5).stroke_width(1)))
                    .map_err(err)?
                    .label("native window")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.5)));
            }
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = color(i);
                let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|(_, y)| y.is_finite() && (!log_y || *y > 0.0)).collect();
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)).point_size(3))
                    .map_err(err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }};
    }
    match (log_x, log_y) {
        (true, true) => draw!(b.build_cartesian_2d((xa..xb).log_scale(), (ya..yb).log_scale()).map_err(err)?),
        (true, false) => draw!(b.build_cartesian_2d((xa..xb).log_scale(), ya..yb).map_err(err)?),
        (false, true) => draw!(b.build_cartesian_2d(xa..xb, (ya..yb).log_scale()).map_err(err)?),
        (false, false) => draw!(b.build_cartesian_2d(xa..xb, ya..yb).map_err(err)?),
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One heat-map panel: `values[d][l]` in [0, 1] for depth `d` and length `l` (None = not run).
pub struct Heatmap {
    pub title: String,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub values: Vec<Vec<Option<f64>>>,
}

/// Red (0) → yellow → green (1).
pub fn score_color(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let (r, g) = if v < 0.5 { (230.0, 60.0 + 340.0 * v) } else { (230.0 - 360.0 * (v - 0.5), 230.0) };
    RGBColor(r as u8, g.min(230.0) as u8, 70)
}

/// Panels side by side (wrapping at 4 a row): depth (y, 0% on top) × length (x).
pub fn heatmaps(path: &Path, title: &str, panels: &[Heatmap]) -> Result<()> {
    fonts();
    if panels.is_empty() {
        return Ok(());
    }
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let cols = panels.len().min(4);
    let rows = panels.len().div_ceil(cols);
    let (pw, ph) = (360u32, 320u32);
    let root = BitMapBackend::new(path, (pw * cols as u32, ph * rows as u32 + 50)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(50);
    top.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = body.split_evenly((rows, cols));
    for (p, area) in panels.iter().zip(areas) {
        let nl = p.lengths.len();
        let nd = p.depths.len();
        let mut chart = ChartBuilder::on(&area)
            .caption(&p.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..nl as f64, nd as f64..0f64)
            .map_err(err)?;
        let lengths = p.lengths.clone();
        let depths = p.depths.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nl.max(1))
            .y_labels(nd.max(1))
            .x_label_formatter(&move |v| {
                let i = (v - 0.5).round();
                if (v - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < lengths.len() {
                    crate::harness::fmt_len(lengths[i as usize])
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&move |v| {
                let i = (v - 0.5).round();
                if (v - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < depths.len() {
                    format!("{}%", depths[i as usize])
                } else {
                    String::new()
                }
            })
            .x_desc("context tokens")
            .y_desc("depth")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        for (d, row) in p.values.iter().enumerate() {
            for (l, v) in row.iter().enumerate() {
                let fill = match v {
                    Some(v) => score_color(*v).filled(),
                    None => RGBColor(235, 235, 235).filled(),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new([(l as f64, d as f64), (l as f64 + 1.0, d as f64 + 1.0)], fill)))
                    .map_err(err)?;
                if let Some(v) = v {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            format!("{:.0}", v * 100.0),
                            (l as f64 + 0.35, d as f64 + 0.6),
                            ("sans-serif", 12),
                        )))
                        .map_err(err)?;
                }
            }
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Grouped bars are not needed: the efficiency plot is two line plots (seconds, K/V MiB).
pub fn two_line_plots(
    path: &Path,
    title: &str,
    left: (&str, &[(String, Vec<(f64, f64)>)]),
    right: (&str, &[(String, Vec<(f64, f64)>)]),
) -> Result<()> {
    // Drawn as two files side by side would complicate linking; render each half to a temp and combine
    // is overkill: draw both charts on one canvas instead.
    fonts();
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let root = BitMapBackend::new(path, (1280, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(44);
    top.titled(title, ("sans-serif", 22)).map_err(err)?;
    let halves = body.split_evenly((1, 2));
    for (area, (ylab, series)) in halves.iter().zip([left, right]) {
        let Some((x0, x1, y0, y1)) = bounds(series, true) else { continue };
        let mut chart = ChartBuilder::on(area)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d((x0 / 1.2..x1 * 1.2).log_scale(), (y0 / 1.3..y1 * 1.3).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("context tokens")
            .y_desc(ylab)
            .x_label_formatter(&|v| crate::harness::fmt_len(v.round() as usize))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let c = color(i);
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|(_, y)| y.is_finite() && *y > 0.0).collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)).point_size(3))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
