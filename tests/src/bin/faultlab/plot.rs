//! The soak's curve as SVG, written by hand: RSS (top) and open descriptors (bottom) of
//! every process against time, with a mark at every fault.

use std::fmt::Write;

use fogline_tests::faultlab::soak::SoakReport;

const W: f64 = 760.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 130.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn panel(
    svg: &mut String,
    r: &SoakReport,
    procs: &[String],
    y0: f64,
    title: &str,
    value: impl Fn(u64, u64) -> f64,
) {
    let plot_w = W - LEFT - RIGHT;
    let t_max = r
        .samples
        .last()
        .map_or(1.0, |s| s.at.as_secs_f64() / 60.0)
        .max(1.0);
    let v_max = nice_max(
        r.samples
            .iter()
            .flat_map(|s| s.procs.values().map(|(rss, fd)| value(*rss, *fd)))
            .fold(0.0, f64::max)
            * 1.1,
    );
    let x = |t: f64| LEFT + t / t_max * plot_w;
    let y = |v: f64| y0 + PANEL_H - v / v_max * PANEL_H;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        y0 - 10.0
    );
    for i in 0..=4 {
        let v = v_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{v:.0}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    let step = if t_max > 30.0 {
        10.0
    } else if t_max > 6.0 {
        2.0
    } else {
        1.0
    };
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{t:.0}</text>"#,
            x(t),
            y0 + PANEL_H + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">minutes</text>"#,
        LEFT + plot_w / 2.0,
        y0 + PANEL_H + 32.0
    );
    for f in &r.faults {
        let fx = x(f.at.as_secs_f64() / 60.0);
        let color = if f.problems.is_empty() {
            "#bbb"
        } else {
            "#d00"
        };
        let _ = writeln!(
            svg,
            r#"<line x1="{fx}" x2="{fx}" y1="{y0}" y2="{}" stroke="{color}" stroke-dasharray="2,3"><title>{}</title></line>"#,
            y0 + PANEL_H,
            f.what
        );
    }
    for (i, p) in procs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = r
            .samples
            .iter()
            .filter_map(|s| {
                let (rss, fd) = s.procs.get(p)?;
                Some(format!(
                    "{:.1},{:.1}",
                    x(s.at.as_secs_f64() / 60.0),
                    y(value(*rss, *fd))
                ))
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = y0 + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{p}</text>"#,
            W - RIGHT + 12.0,
            W - RIGHT + 32.0,
            W - RIGHT + 38.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="black"/>"#
    );
}

pub fn soak_svg(r: &SoakReport) -> String {
    let mut procs: Vec<String> = r
        .samples
        .iter()
        .flat_map(|s| s.procs.keys().cloned())
        .collect();
    procs.sort();
    procs.dedup();
    let h = TOP + 2.0 * PANEL_H + GAP + 60.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
    );
    svg.push('\n');
    let _ = writeln!(svg, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    panel(&mut svg, r, &procs, TOP, "RSS (MiB)", |rss, _| {
        rss as f64 / 1024.0
    });
    panel(
        &mut svg,
        r,
        &procs,
        TOP + PANEL_H + GAP,
        "Open file descriptors (dashed: a fault)",
        |_, fd| fd as f64,
    );
    svg.push_str("</svg>\n");
    svg
}
