//! The chart in BENCHMARKS.md: server CPU per echoed message and server
//! memory per idle connection, one bar per peer, on log scales because the
//! peers differ by orders of magnitude.

use std::path::Path;

use anyhow::anyhow;
use bench::record::human_number;
use plotters::prelude::*;

use crate::peers::PeerKind;
use crate::plan::Workload;
use crate::results::Results;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 460;

/// One colour per peer, stable across runs.
fn colour(peer: PeerKind) -> RGBColor {
    match peer {
        PeerKind::Wshd => RGBColor(0xd6, 0x27, 0x28),
        PeerKind::Wshd1 => RGBColor(0xff, 0x98, 0x96),
        PeerKind::Raw => RGBColor(0x99, 0x99, 0x99),
        PeerKind::Raw4k => RGBColor(0x44, 0x44, 0x44),
        PeerKind::Raw4k1 => RGBColor(0x8c, 0x56, 0x4b),
        PeerKind::FastWs => RGBColor(0xff, 0x7f, 0x0e),
        PeerKind::NodeWs => RGBColor(0x2c, 0xa0, 0x2c),
        PeerKind::Uws => RGBColor(0x8c, 0x56, 0x4b),
        PeerKind::Pywebsocket => RGBColor(0x1f, 0x77, 0xb4),
        PeerKind::WshdAdmin => RGBColor(0x94, 0x67, 0xbd),
        PeerKind::WshdTls => RGBColor(0x17, 0xbe, 0xcf),
        PeerKind::Raw4kTls => RGBColor(0xc5, 0xb0, 0xd5),
    }
}

/// A panel: groups of bars, one group per workload.
struct Panel<'a> {
    caption: &'a str,
    y_label: &'a str,
    metric: &'a str,
    groups: Vec<(&'a str, &'a str)>,
}

/// Draws the chart as SVG. Returns false when there was nothing to draw.
pub fn draw(
    path: &Path,
    workloads: &[Workload],
    peers: &[PeerKind],
    results: &Results,
) -> anyhow::Result<bool> {
    let short = |key: &'static str| -> (&'static str, &'static str) {
        let label = match key {
            "echo-32-c1" => "32 B, C=1",
            "echo-32-c100" => "32 B, C=100",
            "echo-32-c1000" => "32 B, C=1000",
            "echo-32-c1000-paced" => "32 B, C=1000, 20/s each",
            "echo-64k-c10" => "64 KiB, C=10",
            "idle-10k" => "10,000 conns",
            "idle-19k" => "19,000 conns",
            "echo-32-c100-pinned" => "32 B, C=100, pinned",
            "echo-32-c1000-pinned" => "32 B, C=1000, pinned",
            "echo-64k-c10-pinned" => "64 KiB, C=10, pinned",
            "deflate-echo-4k-c100" => "4 KiB JSON, deflate",
            "deflate-idle-1k" => "1,000 deflate conns",
            other => other,
        };
        (key, label)
    };
    let cpu = Panel {
        caption: "Server CPU per echoed message (µs, log scale, lower is better)",
        y_label: "µs per message",
        metric: "cpu_us_per_msg",
        groups: workloads
            .iter()
            .filter(|w| w.primary().metric == "cpu_us_per_msg")
            .map(|w| short(w.key))
            .collect(),
    };
    let memory = Panel {
        caption: "Server memory per idle connection (KiB, log scale, lower is better)",
        y_label: "KiB per connection",
        metric: "rss_kib_per_conn",
        groups: workloads
            .iter()
            .filter(|w| w.primary().metric == "rss_kib_per_conn")
            .map(|w| short(w.key))
            .collect(),
    };
    let has_data = |panel: &Panel<'_>| {
        panel.groups.iter().any(|(key, _)| {
            peers
                .iter()
                .any(|&p| results.median(key, p, panel.metric).is_some())
        })
    };
    if !has_data(&cpu) && !has_data(&memory) {
        return Ok(false);
    }

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(WIDTH * 3 / 5);
    draw_panel(&left, &cpu, peers, results)?;
    draw_panel(&right, &memory, peers, results)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(true)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel<'_>,
    peers: &[PeerKind],
    results: &Results,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let values: Vec<f64> = panel
        .groups
        .iter()
        .flat_map(|(key, _)| {
            peers
                .iter()
                .filter_map(|&p| results.median(key, p, panel.metric))
        })
        .filter(|v| *v > 0.0)
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    // Headroom above the tallest bar for its label and the legend.
    let top = values.iter().copied().fold(f64::MIN, f64::max) * 12.0;
    let bottom = values.iter().copied().fold(f64::MAX, f64::min) / 3.0;
    let groups = panel.groups.len();
    let labels: Vec<&str> = panel.groups.iter().map(|(_, label)| *label).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..(groups as f64 - 0.5), (bottom..top).log_scale())
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.round();
            if (x - index).abs() < 1e-6 && index >= 0.0 {
                labels
                    .get(index as usize)
                    .map_or(String::new(), |s| (*s).to_owned())
            } else {
                String::new()
            }
        })
        .y_desc(panel.y_label)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;

    let bar_width = 0.8 / peers.len().max(1) as f64;
    for (slot, &peer) in peers.iter().enumerate() {
        let bars: Vec<(f64, f64)> = panel
            .groups
            .iter()
            .enumerate()
            .filter_map(|(group, (key, _))| {
                let value = results.median(key, peer, panel.metric)?;
                let x = group as f64 - 0.4 + slot as f64 * bar_width;
                Some((x, value.max(bottom)))
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let style = colour(peer).filled();
        chart
            .draw_series(bars.iter().map(|&(x, value)| {
                Rectangle::new([(x, bottom), (x + bar_width * 0.9, value)], style)
            }))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(peer.key())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], style));
        let font = ("sans-serif", 10).into_font().color(&BLACK);
        chart
            .draw_series(
                bars.iter().map(|&(x, value)| {
                    Text::new(human_number(value), (x, value * 1.12), font.clone())
                }),
            )
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
