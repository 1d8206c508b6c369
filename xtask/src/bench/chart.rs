//! The PNG chart of scaling curves referenced from BENCHMARKS.md and the README.

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use plotters::prelude::*;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One curve: a name and its (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Draws `series` on log-log axes into `out`.
pub fn scaling(
    out: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let font =
        std::fs::read(FONT).with_context(|| format!("reading {FONT} (fonts-dejavu-core)"))?;
    // plotters keeps the font for the life of the process.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let points = series.iter().flat_map(|s| s.1.iter());
    let (x_max, y_min, y_max) = points.fold((1.0f64, f64::MAX, 0.0f64), |(xm, lo, hi), &(x, y)| {
        (xm.max(x), lo.min(y), hi.max(y))
    });
    let root = BitMapBackend::new(out, (900, 560)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (0.8f64..x_max * 1.25).log_scale(),
                ((y_min * 0.5).max(0.01)..y_max * 2.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .draw()?;
        let colors = [RED, BLUE, GREEN, MAGENTA, BLACK, CYAN];
        for (i, (name, pts)) in series.iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", out.display()))
}
