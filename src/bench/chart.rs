//! The PNG chart: generation tok/s against lookahead depth (median with a
//! min–max bar), the estimator's prediction, the disk ceiling and the
//! llama.cpp baselines as horizontal lines; the y axis turns logarithmic when
//! the values span more than 25×. Text uses DejaVu Sans embedded in
//! the binary, so no system font or fontconfig is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::config::Kind;
use super::report::BenchDoc;

const FONT: &str = "sans-serif";
const W: u32 = 1000;
const H: u32 = 620;

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow!("the embedded chart font is not a valid font"));
    });
    res
}

/// The series the chart draws, read off the summaries.
#[derive(Debug, Default, PartialEq)]
pub struct ChartData {
    /// (depth, median, min, max) generation tok/s.
    pub measured: Vec<(f64, f64, f64, f64)>,
    /// (depth, predicted tok/s).
    pub predicted: Vec<(f64, f64)>,
    /// (depth, disk-bound tok/s).
    pub ceiling: Vec<(f64, f64)>,
    /// (label, median generation tok/s).
    pub baselines: Vec<(String, f64)>,
    /// (label, why) of configurations without a single successful run.
    pub failed: Vec<(String, String)>,
}

impl ChartData {
    pub fn from_doc(doc: &BenchDoc) -> ChartData {
        let mut d = ChartData::default();
        for s in &doc.summary {
            match (s.kind, s.lookahead) {
                (Kind::Streaming, Some(depth)) => {
                    let x = depth as f64;
                    if let Some(g) = s.gen_tps {
                        d.measured.push((x, g.median, g.min, g.max));
                    }
                    if let Some(p) = s.predicted_tps.filter(|p| p.is_finite() && *p > 0.0) {
                        d.predicted.push((x, p));
                    }
                    if let Some(c) = s
                        .disk_ceiling_tps
                        .or(s.ceiling_tps)
                        .filter(|c| c.is_finite() && *c > 0.0)
                    {
                        d.ceiling.push((x, c));
                    }
                }
                (Kind::Baseline, _) => {
                    if let Some(g) = s.gen_tps {
                        d.baselines.push((s.label.clone(), g.median));
                    }
                }
                _ => {}
            }
            if s.gen_tps.is_none() && s.runs > 0 {
                d.failed.push((
                    s.label.clone(),
                    s.errors.first().cloned().unwrap_or_else(|| "failed".into()),
                ));
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        self.measured.is_empty() && self.baselines.is_empty()
    }
}

/// Draws the chart to `path` (PNG).
pub fn draw(path: &Path, doc: &BenchDoc) -> Result<()> {
    register_font()?;
    let data = ChartData::from_doc(doc);
    draw_data(path, &data, &title(doc), doc.disk_ceiling_gbps)
        .map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn title(doc: &BenchDoc) -> String {
    let budget = doc
        .settings
        .ram_budget_bytes
        .map(crate::scheduler::format_bytes)
        .unwrap_or_else(|| "default".into());
    format!(
        "{}: generation tok/s vs lookahead ({} thread{}, RAM budget {budget})",
        doc.model.file_name,
        doc.settings.threads,
        if doc.settings.threads == 1 { "" } else { "s" }
    )
}

type DynErr = Box<dyn std::error::Error>;

/// Largest over smallest plotted value above which the y axis goes logarithmic
/// (a thrashing baseline, a fast stream and the disk ceiling can span 100×).
const LOG_RATIO: f64 = 25.0;

fn draw_data(
    path: &Path,
    data: &ChartData,
    title: &str,
    disk_gbps: Option<f64>,
) -> Result<(), DynErr> {
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;

    let xs: Vec<f64> = data.measured.iter().map(|m| m.0).collect();
    let (x0, x1) = match (
        xs.iter().copied().reduce(f64::min),
        xs.iter().copied().reduce(f64::max),
    ) {
        (Some(a), Some(b)) if b > a => (a - 0.3, b + 0.3),
        (Some(a), _) => (a - 1.0, a + 1.0),
        _ => (0.0, 1.0),
    };
    let values: Vec<f64> = data
        .measured
        .iter()
        .flat_map(|m| [m.1, m.2, m.3])
        .chain(data.predicted.iter().map(|p| p.1))
        .chain(data.ceiling.iter().map(|c| c.1))
        .chain(data.baselines.iter().map(|b| b.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0f64, f64::max);
    if !values.is_empty() && hi / lo > LOG_RATIO {
        // Headroom above the data for the legend: a factor on a log axis.
        let y = (lo / 1.5)..(hi * 4.0);
        plot(
            &root,
            x0..x1,
            y.log_scale(),
            "generation tok/s (log scale)",
            data,
            title,
            disk_gbps,
            xs.len(),
        )?;
    } else {
        let y1 = if hi > 0.0 { hi * 1.4 } else { 1.0 };
        plot(
            &root,
            x0..x1,
            0.0..y1,
            "generation tok/s",
            data,
            title,
            disk_gbps,
            xs.len(),
        )?;
    }
    root.present()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn plot<'a, Y>(
    root: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    x: std::ops::Range<f64>,
    y: Y,
    y_desc: &str,
    data: &ChartData,
    title: &str,
    disk_gbps: Option<f64>,
    n_depths: usize,
) -> Result<(), DynErr>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let (x0, x1) = (x.start, x.end);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("lookahead depth (streamed layers read ahead)")
        .y_desc(y_desc)
        .x_labels(n_depths.clamp(2, 12))
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;

    let legend_line = |style: ShapeStyle| {
        move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 24, y)], style)
    };
    if !data.measured.is_empty() {
        chart
            .draw_series(LineSeries::new(
                data.measured.iter().map(|m| (m.0, m.1)),
                BLUE.stroke_width(3),
            ))?
            .label("measured (median; bars: min–max)")
            .legend(legend_line(BLUE.stroke_width(3)));
        chart.draw_series(data.measured.iter().filter(|m| m.3 > m.2).map(|m| {
            PathElement::new(vec![(m.0, m.2), (m.0, m.3)], BLUE.mix(0.6).stroke_width(2))
        }))?;
        chart.draw_series(
            data.measured
                .iter()
                .map(|m| Circle::new((m.0, m.1), 5, BLUE.filled())),
        )?;
    }
    if !data.predicted.is_empty() {
        let style = RGBColor(230, 120, 0).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                data.predicted.iter().copied(),
                8,
                6,
                style,
            ))?
            .label("predicted (estimator)")
            .legend(legend_line(style));
    }
    if !data.ceiling.is_empty() {
        let style = RED.stroke_width(2);
        let gbps = disk_gbps
            .map(|g| format!(" ({g:.2} GB/s ÷ bytes read per token)"))
            .unwrap_or_default();
        chart
            .draw_series(LineSeries::new(data.ceiling.iter().copied(), style))?
            .label(format!("disk ceiling{gbps}"))
            .legend(legend_line(style));
    }
    let palette = [
        RGBColor(0, 150, 60),
        RGBColor(140, 60, 170),
        RGBColor(90, 90, 90),
    ];
    for (i, (label, tps)) in data.baselines.iter().enumerate() {
        let style = palette[i % palette.len()].stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, *tps), (x1, *tps)],
                12,
                5,
                style,
            ))?
            .label(format!("{label}: {tps:.2} tok/s"))
            .legend(legend_line(style));
    }
    for (label, why) in &data.failed {
        // No line to draw: a legend entry says why.
        let style = RGBColor(150, 150, 150).stroke_width(1);
        chart
            .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
            .label(format!("{label}: no result ({why})"))
            .legend(move |(x, y): (i32, i32)| Cross::new((x + 12, y), 5, style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        register_font().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        let data = ChartData {
            measured: vec![
                (0.0, 5.0, 4.5, 5.5),
                (2.0, 7.0, 6.0, 7.5),
                (4.0, 7.2, 7.2, 7.2),
            ],
            predicted: vec![(0.0, 6.0), (2.0, 8.0), (4.0, 8.0)],
            ceiling: vec![(0.0, 9.0), (2.0, 9.0), (4.0, 9.0)],
            baselines: vec![
                ("llama.cpp mmap".into(), 3.0),
                ("llama.cpp dio".into(), 3.5),
            ],
            failed: vec![("llama.cpp dio".into(), "killed by signal 9".into())],
        };
        draw_data(&p, &data, "test", Some(2.0)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"));
        // A log axis (the ceiling 450x the rest) and a single depth also draw.
        let data = ChartData {
            measured: vec![(1.0, 2.0, 2.0, 2.0)],
            ceiling: vec![(1.0, 900.0)],
            ..ChartData::default()
        };
        draw_data(&p, &data, "test", None).unwrap();
    }
}
