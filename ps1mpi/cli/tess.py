"""``ps1mpi tess``: look up skycells of a sky tessellation.

Subcommands::

    ps1mpi tess lookup RA DEC [--tess RINGS.V3]
    ps1mpi tess footprint --ra RA --dec DEC --pa PA [--camera gpc1] [--tess RINGS.V3]
                          [--distortion none|gpc1]
    ps1mpi tess wcs SKYCELL [--tess RINGS.V3]
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("Sky tessellation look-ups: the skycells holding a position, the skycells an "
               "exposure touches, and the FITS WCS header of a skycell.")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line of ``ps1mpi tess``.

    Parameters
    ----------
    argv : list of str
        Arguments after ``tess``.

    Returns
    -------
    argparse.Namespace
    """
    p = argparse.ArgumentParser(prog="ps1mpi tess", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    lk = sub.add_parser("lookup", help="skycells containing a sky position")
    lk.add_argument("ra", type=float, help="right ascension (degrees)")
    lk.add_argument("dec", type=float, help="declination (degrees)")
    lk.add_argument("--tess", default="RINGS.V3", help="tessellation (default RINGS.V3)")

    fp = sub.add_parser("footprint", help="skycells touched by an exposure")
    fp.add_argument("--ra", type=float, required=True, help="boresight RA (degrees)")
    fp.add_argument("--dec", type=float, required=True, help="boresight Dec (degrees)")
    fp.add_argument("--pa", type=float, default=0.0,
                    help="position angle of the focal-plane +Y axis, N through E (degrees)")
    fp.add_argument("--camera", default="gpc1", help="camera name or TOML path (default gpc1)")
    fp.add_argument("--tess", default="RINGS.V3", help="tessellation (default RINGS.V3)")
    fp.add_argument("--scale", type=float, default=None,
                    help="pixel scale (arcsec/pixel; default the camera's)")
    fp.add_argument("--distortion", choices=("none", "gpc1"), default="gpc1",
                    help="focal-plane distortion (default gpc1: radial cubic of 3 px at "
                         "the half-width of the camera)")

    wc = sub.add_parser("wcs", help="print the FITS header (WCS) of a skycell")
    wc.add_argument("skycell", help="skycell name, e.g. skycell.1405.053")
    wc.add_argument("--tess", default="RINGS.V3", help="tessellation (default RINGS.V3)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run ``ps1mpi tess``; prints to standard output.

    Returns
    -------
    int
        0 on success, 2 on bad input (the message goes to standard error).
    """
    from ps1mpi.geometry.tessellation import load_tessellation

    try:
        tess = load_tessellation(args.tess)
        if args.command == "lookup":
            r = tess.locate(args.ra, args.dec)
            if r["projcell"].size == 0:
                lo, hi = tess.dec_limit
                print(f"no skycell of {tess.name} holds RA {args.ra} Dec {args.dec} "
                      f"(covered Dec range {lo:.3f} .. {hi:.3f})", file=sys.stderr)
                return 1
            for p, s, x, y in zip(r["projcell"], r["index"], r["x"], r["y"]):
                print(f"{tess.skycell_name(p, s)}  x={x:.2f}  y={y:.2f}")
            return 0
        if args.command == "footprint":
            from ps1mpi.geometry.camera import load_camera
            from ps1mpi.geometry.focalplane import Distortion, FocalPlaneModel

            cam = load_camera(args.camera)
            if args.distortion == "gpc1":
                x0, x1, y0, y1 = cam.focal_plane_extent()
                dist = Distortion.gpc1_like(norm=0.5 * max(x1 - x0, y1 - y0))
            else:
                dist = Distortion.none()
            model = FocalPlaneModel(args.ra, args.dec, args.pa,
                                    args.scale if args.scale else cam.pixel_scale, dist)
            ra, dec = model.exposure_footprint(cam)
            for name in tess.skycells_in_polygon(ra, dec):
                print(name)
            return 0
        if args.command == "wcs":
            print(tess.skycell(args.skycell).header().tostring(sep="\n", endcard=False,
                                                                padding=False))
            return 0
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"ps1mpi tess: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled subcommand {args.command!r}")  # argparse prevents this


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(parse(sys.argv[1:])))
