//! The loss curve PNG written next to a trained adapter (plotters, bitmap backend). Axis text
//! uses DejaVu Sans when the system has it; without a font the curve is drawn unlabelled.

use super::trainer::StepLog;
use plotters::prelude::*;

const FONT_PATHS: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];

fn register_font() -> bool {
    for p in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(p) {
            let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_ok() {
                return true;
            }
        }
    }
    false
}

/// PNG bytes of loss (and a 10-step moving average) against step.
pub fn loss_curve_png(log: &[StepLog]) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(!log.is_empty(), "empty training log");
    let (w, h) = (800u32, 480u32);
    let labelled = register_font();
    let tmp = tempfile_path();
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_loss = log.iter().map(|l| l.loss).fold(0.0, f64::max) * 1.05;
        let steps = log.last().map_or(1, |l| l.step) as f64;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if labelled {
            builder
                .caption("training loss (answer tokens + EOS)", ("sans-serif", 22))
                .x_label_area_size(40)
                .y_label_area_size(55);
        }
        let mut chart = builder.build_cartesian_2d(0f64..steps, 0f64..max_loss.max(1e-6))?;
        if labelled {
            chart.configure_mesh().x_desc("step").y_desc("loss").draw()?;
        }
        chart.draw_series(LineSeries::new(
            log.iter().map(|l| (l.step as f64, l.loss)),
            &BLUE.mix(0.4),
        ))?;
        let avg: Vec<(f64, f64)> = log
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let from = i.saturating_sub(9);
                let window = &log[from..=i];
                (l.step as f64, window.iter().map(|x| x.loss).sum::<f64>() / window.len() as f64)
            })
            .collect();
        chart.draw_series(LineSeries::new(avg, RED.stroke_width(2)))?;
        root.present()?;
    }
    let png = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(png)
}

/// plotters' PNG encoder writes to a path; we want the bytes (written with the adapter).
fn tempfile_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "loraplex-loss-{}-{}.png",
        std::process::id(),
        rand::random::<u32>()
    ))
}
