"""The Pc-Pw plane of CRaFT's THS figure as SVG text (report rendering, plumbing: evaluate.py
writes it beside report.md). The numbers it draws come from kernels/ths.py."""
import numpy as np

LABEL_SLOTS = [(7, -6), (7, 14), (-7, -6), (-7, 14)] + [
    (sgn * 7, d) for d in (-20, 28, -34, 42, -48, 56) for sgn in (1, -1)]   # SVG label offsets


def ths_svg(points, refs, title=""):
    """The Pc-Pw plane of CRaFT's THS figure as SVG text: x = Pc, y = Pw (SPEC 7: E = (Pc, Pw)),
    a ray from the origin through each Init-Basic point (THS = 0 on it, > 0 below it), one
    labelled point per method; ID = filled circles, OOD = open squares, one colour each.
    points: [(name, split, pc, pw)]; refs: {split: (pc0, pw0)}."""
    from xml.sax.saxutils import escape
    vals = [v for _, _, pc, pw in points for v in (pc, pw)] + [10.0]
    step = next(s for s in (2, 5, 10, 20, 25) if max(vals) * 1.1 / s <= 6)
    lim = step * int(np.ceil(max(vals) * 1.1 / step))
    X0, Y0, P = 70, 430, 380                      # plot origin (px) and side
    sx = lambda v: X0 + v / lim * P               # noqa: E731
    sy = lambda v: Y0 - v / lim * P               # noqa: E731
    color = {"id": "#1f5fbf", "ood": "#d0471b"}
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="500" '
         'font-family="sans-serif" font-size="12">',
         '<rect width="640" height="500" fill="white"/>',
         f'<text x="{X0 + P / 2}" y="24" text-anchor="middle" font-size="14">'
         f'{escape(title)}</text>']
    for k in range(0, lim + 1, step):
        o += [f'<line x1="{sx(k):.1f}" y1="{Y0}" x2="{sx(k):.1f}" y2="{Y0 - P}" stroke="#e4e4e4"/>',
              f'<line x1="{X0}" y1="{sy(k):.1f}" x2="{X0 + P}" y2="{sy(k):.1f}" stroke="#e4e4e4"/>',
              f'<text x="{sx(k):.1f}" y="{Y0 + 16}" text-anchor="middle">{k}</text>',
              f'<text x="{X0 - 6}" y="{sy(k) + 4:.1f}" text-anchor="end">{k}</text>']
    o += [f'<rect x="{X0}" y="{Y0 - P}" width="{P}" height="{P}" fill="none" stroke="black"/>',
          f'<text x="{X0 + P / 2}" y="{Y0 + 36}" text-anchor="middle">Pc (% correct)</text>',
          f'<text x="18" y="{Y0 - P / 2}" text-anchor="middle" '
          f'transform="rotate(-90 18 {Y0 - P / 2})">Pw (% wrong)</text>']
    for s, (pc0, pw0) in refs.items():
        if pc0 <= 0 and pw0 <= 0:
            continue                              # Init-Basic never answered: no ray
        t = min(lim / pc0 if pc0 > 0 else np.inf, lim / pw0 if pw0 > 0 else np.inf)
        o.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(pc0 * t):.1f}" y2="{sy(pw0 * t):.1f}" '
                 f'stroke="{color[s]}" stroke-dasharray="6 4" class="ray-{s}"/>')
    taken = [(sx(pc) - 5, sy(pw) - 5, sx(pc) + 5, sy(pw) + 5) for _, _, pc, pw in points]
    for name, s, pc, pw in points:
        x, y, c = sx(pc), sy(pw), color[s]
        o.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{c}" class="point-{s}"/>'
                 if s == "id" else
                 f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" fill="white" '
                 f'stroke="{c}" stroke-width="2" class="point-{s}"/>')
        w = 6.6 * len(name)                    # greedy label placement: first free slot
        for dx, dy in LABEL_SLOTS:
            bx = x + dx if dx >= 0 else x + dx - w
            box = (bx, y + dy - 10, bx + w, y + dy + 2)
            if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3]
                       for t in taken):
                break
        taken.append(box)
        if abs(dy) > 8:                        # displaced label: a leader line to its point
            o.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{box[0] if dx >= 0 else box[2]:.1f}" '
                     f'y2="{y + dy - 4:.1f}" stroke="{c}" stroke-width="0.6"/>')
        o.append(f'<text x="{box[0]:.1f}" y="{y + dy:.1f}" fill="{c}" stroke="white" '
                 f'stroke-width="3" paint-order="stroke">{escape(name)}</text>')
    lx = X0 + P + 20
    o += [f'<circle cx="{lx}" cy="{Y0 - P + 10}" r="4.5" fill="{color["id"]}"/>',
          f'<text x="{lx + 10}" y="{Y0 - P + 14}">ID test</text>',
          f'<rect x="{lx - 4.5}" y="{Y0 - P + 30.5}" width="9" height="9" fill="white" '
          f'stroke="{color["ood"]}" stroke-width="2"/>',
          f'<text x="{lx + 10}" y="{Y0 - P + 39}">OOD test</text>',
          f'<line x1="{lx - 6}" y1="{Y0 - P + 60}" x2="{lx + 6}" y2="{Y0 - P + 60}" '
          'stroke="gray" stroke-dasharray="6 4"/>',
          f'<text x="{lx + 10}" y="{Y0 - P + 64}">THS = 0 (Init-Basic)</text>',
          f'<text x="{lx - 6}" y="{Y0 - P + 84}">below a ray: THS &gt; 0</text>', '</svg>']
    return "\n".join(o) + "\n"
