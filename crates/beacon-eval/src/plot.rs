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
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
        .collect();
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
    let Some((x0, x1, y0, y1)) = bounds(series, log_y) else {
        return Ok(());
    };
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (xa, xb) = if log_x {
        (x0 / 1.2, x1 * 1.2)
    } else {
        (x0, x1)
    };
    let (ya, yb) = if log_y {
        (y0 / 1.3, y1 * 1.3)
    } else {
        (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    };
    let xs = distinct_xs(series);
    let xk = if xs.len() <= 12 { xs } else { Vec::new() };
    let yk = if log_y {
        nice_log_ticks(ya, yb)
    } else {
        Vec::new()
    };
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&|v| {
                    if log_x {
                        crate::harness::fmt_len(v.round() as usize)
                    } else {
                        format!("{v}")
                    }
                })
                .y_label_formatter(&|v| fmt_num(*v))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            if let Some(m) = marker_x.filter(|m| *m >= xa && *m <= xb) {
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(m, ya), (m, yb)],
                        6,
                        4,
                        BLACK.mix(0.5).stroke_width(1),
                    ))
                    .map_err(err)?
                    .label("native window")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.5)));
            }
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = color(i);
                let pts: Vec<(f64, f64)> = pts
                    .iter()
                    .copied()
                    .filter(|(_, y)| y.is_finite() && (!log_y || *y > 0.0))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)).point_size(3))
                    .map_err(err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
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
    let xr = (xa..xb).log_scale().base(2.0).with_key_points(xk);
    match (log_x, log_y) {
        (true, true) => draw!(b
            .build_cartesian_2d(xr, (ya..yb).log_scale().with_key_points(yk))
            .map_err(err)?),
        (true, false) => draw!(b.build_cartesian_2d(xr, ya..yb).map_err(err)?),
        (false, true) => draw!(b
            .build_cartesian_2d(xa..xb, (ya..yb).log_scale().with_key_points(yk))
            .map_err(err)?),
        (false, false) => draw!(b.build_cartesian_2d(xa..xb, ya..yb).map_err(err)?),
    }
    root.present().map_err(err)?;
    Ok(())
}

/// 1-2-5 ticks within [lo, hi].
pub fn nice_log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    if !(lo > 0.0 && hi > lo) {
        return out;
    }
    for ms in [
        &[1.0, 2.0, 5.0][..],
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0][..],
    ] {
        out.clear();
        let mut e = lo.log10().floor() as i32 - 1;
        while 10f64.powi(e) <= hi {
            for m in ms {
                let v = m * 10f64.powi(e);
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
            e += 1;
        }
        if out.len() >= 4 {
            break;
        }
    }
    out
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 || v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let decimals = (1 - v.abs().log10().floor() as i32).clamp(1, 6) as usize;
        format!("{v:.decimals$}")
    }
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
    let (r, g) = if v < 0.5 {
        (230.0, 60.0 + 340.0 * v)
    } else {
        (230.0 - 360.0 * (v - 0.5), 230.0)
    };
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
    let root =
        BitMapBackend::new(path, (pw * cols as u32, ph * rows as u32 + 50)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(50);
    top.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = body.split_evenly((rows, cols));
    for (p, area) in panels.iter().zip(areas) {
        let nl = p.lengths.len();
        let nd = p.depths.len();
        // Drawn in pixels: a grid of cells, lengths along x, depths down y (0 % on top).
        let (w, h) = area.dim_in_pixel();
        let (w, h) = (w as i32, h as i32);
        let (left, top, right, bottom) = (64, 34, 12, 44);
        let cw = ((w - left - right) / nl.max(1) as i32).max(1);
        let ch = ((h - top - bottom) / nd.max(1) as i32).max(1);
        let center = plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        );
        let font = |size: i32| ("sans-serif", size).into_font().color(&BLACK).pos(center);
        area.draw(&Text::new(
            p.title.clone(),
            (left + cw * nl as i32 / 2, top / 2),
            font(16),
        ))
        .map_err(err)?;
        for (d, row) in p.values.iter().enumerate() {
            let y = top + ch * d as i32;
            for (l, v) in row.iter().enumerate() {
                let x = left + cw * l as i32;
                let fill = match v {
                    Some(v) => score_color(*v).filled(),
                    None => RGBColor(235, 235, 235).filled(),
                };
                area.draw(&Rectangle::new([(x, y), (x + cw - 1, y + ch - 1)], fill))
                    .map_err(err)?;
                if let Some(v) = v {
                    area.draw(&Text::new(
                        format!("{:.0}", v * 100.0),
                        (x + cw / 2, y + ch / 2),
                        font(13),
                    ))
                    .map_err(err)?;
                }
            }
            let label = format!("{}%", p.depths.get(d).copied().unwrap_or(0.0));
            area.draw(&Text::new(label, (left / 2 + 6, y + ch / 2), font(12)))
                .map_err(err)?;
        }
        for (l, len) in p.lengths.iter().enumerate() {
            let x = left + cw * l as i32 + cw / 2;
            area.draw(&Text::new(
                crate::harness::fmt_len(*len),
                (x, top + ch * nd as i32 + 12),
                font(12),
            ))
            .map_err(err)?;
        }
        area.draw(&Text::new(
            "context tokens",
            (left + cw * nl as i32 / 2, top + ch * nd as i32 + 30),
            font(12),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Named lines of (x, y) points.
pub type Series = [(String, Vec<(f64, f64)>)];

/// Two log-log line charts side by side (the efficiency plot: seconds and K/V MiB).
pub fn two_line_plots(
    path: &Path,
    title: &str,
    left: (&str, &Series),
    right: (&str, &Series),
) -> Result<()> {
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
        let Some((x0, x1, y0, y1)) = bounds(series, true) else {
            continue;
        };
        let mut chart = ChartBuilder::on(area)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (x0 / 1.2..x1 * 1.2)
                    .log_scale()
                    .base(2.0)
                    .with_key_points(distinct_xs(series)),
                (y0 / 1.3..y1 * 1.3)
                    .log_scale()
                    .with_key_points(nice_log_ticks(y0 / 1.3, y1 * 1.3)),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("context tokens")
            .y_desc(ylab)
            .x_label_formatter(&|v| crate::harness::fmt_len(v.round() as usize))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let c = color(i);
            let pts: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|(_, y)| y.is_finite() && *y > 0.0)
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)).point_size(3))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
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

/// The x values of all series, sorted, each once (the axis key points).
fn distinct_xs(series: &[(String, Vec<(f64, f64)>)]) -> Vec<f64> {
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs.dedup();
    xs
}

/// How a styled series' line is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dash {
    Solid,
    Dashed,
    Dotted,
}

/// The marker drawn at each point of a styled series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    None,
    Circle,
    Cross,
    Triangle,
}

/// A named line with its colour index ([`color`]), dash and point marker.
#[derive(Debug, Clone)]
pub struct StyledSeries {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: usize,
    pub dash: Dash,
    pub marker: Marker,
}

/// Styled lines on a log₂ x axis (key points `x_ticks`, e.g. the ratios) and a log y axis; the
/// legend sits beside the chart on the right.
pub fn styled_line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[StyledSeries],
    x_ticks: &[f64],
) -> Result<()> {
    fonts();
    let plain: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.name.clone(), s.points.clone()))
        .collect();
    let Some((x0, x1, y0, y1)) = bounds(&plain, true) else {
        return Ok(());
    };
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let legend_w = 220u32;
    let rows = series.len() as u32;
    let (w, h) = (900 + legend_w, (640u32).max(80 + 22 * rows));
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(w - legend_w);
    let (ya, yb) = (y0 / 1.15, y1 * 1.15);
    let (xa, xb) = if x1 > x0 {
        (x0 / 1.25, x1 * 1.25)
    } else {
        (x0 / 2.0, x0 * 2.0)
    };
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (xa..xb)
                .log_scale()
                .base(2.0)
                .with_key_points(x_ticks.to_vec()),
            (ya..yb)
                .log_scale()
                .with_key_points(dense_log_ticks(ya, yb)),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("×{}", v.round()))
        .y_label_formatter(&|v| fmt_num(*v))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for s in series {
        let c = color(s.color);
        let style = c.stroke_width(2);
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0)
            .collect();
        match s.dash {
            Dash::Solid => chart.draw_series(LineSeries::new(pts.clone(), style)),
            Dash::Dashed => chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style)),
            Dash::Dotted => chart.draw_series(DashedLineSeries::new(pts.clone(), 2, 4, style)),
        }
        .map_err(err)?;
        match s.marker {
            Marker::None => {}
            Marker::Circle => {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                    .map_err(err)?;
            }
            Marker::Cross => {
                chart
                    .draw_series(pts.iter().map(|&p| Cross::new(p, 5, style)))
                    .map_err(err)?;
            }
            Marker::Triangle => {
                chart
                    .draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 6, c.filled())))
                    .map_err(err)?;
            }
        }
    }
    // The legend, in pixels: a sample of each line (dash and marker) and its name.
    let left_pos = plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Left,
        plotters::style::text_anchor::VPos::Center,
    );
    for (k, s) in series.iter().enumerate() {
        let c = color(s.color);
        let style = c.stroke_width(2);
        let (x, y) = (8i32, 60 + 22 * k as i32);
        let pieces: Vec<(i32, i32)> = match s.dash {
            Dash::Solid => vec![(0, 28)],
            Dash::Dashed => vec![(0, 9), (14, 28)],
            Dash::Dotted => (0..5).map(|i| (6 * i, 6 * i + 2)).collect(),
        };
        for (a, b) in pieces {
            right
                .draw(&PathElement::new(vec![(x + a, y), (x + b, y)], style))
                .map_err(err)?;
        }
        let m = (x + 14, y);
        match s.marker {
            Marker::None => {}
            Marker::Circle => right.draw(&Circle::new(m, 4, c.filled())).map_err(err)?,
            Marker::Cross => right.draw(&Cross::new(m, 5, style)).map_err(err)?,
            Marker::Triangle => right
                .draw(&TriangleMarker::new(m, 6, c.filled()))
                .map_err(err)?,
        }
        right
            .draw(&Text::new(
                s.name.clone(),
                (x + 36, y),
                ("sans-serif", 14).into_font().color(&BLACK).pos(left_pos),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// [`nice_log_ticks`], or when they are fewer than 5 (a narrow range), about 6 ticks evenly spaced in
/// log space, rounded to two significant digits.
fn dense_log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let nice = nice_log_ticks(lo, hi);
    if nice.len() >= 5 || !(lo > 0.0 && hi > lo) {
        return nice;
    }
    let (a, b) = (lo.ln(), hi.ln());
    let mut out: Vec<f64> = (1..=6)
        .map(|i| {
            let v = (a + (b - a) * i as f64 / 7.0).exp();
            let scale = 10f64.powi(v.log10().floor() as i32 - 1);
            (v / scale).round() * scale
        })
        .filter(|v| *v >= lo && *v <= hi)
        .collect();
    out.dedup();
    out
}
