"""Render a workbook the way a person would see it printed: xlsx -> PDF (LibreOffice) -> one PNG a page (poppler).

    python scripts/render_workbook.py results/sweep.xlsx results/workbook-render

Prints the PDF and PNG paths. Needs `soffice` (Debian: libreoffice-calc) and `pdftoppm` (poppler-utils).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def render(xlsx: Path, outdir: Path, dpi: int = 80, timeout: int = 300) -> tuple[Path, list[Path]]:
    """The PDF of `xlsx` and its pages as PNGs (`<stem>-<page>.png`), all in `outdir`."""
    missing = [tool for tool in ("soffice", "pdftoppm") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found: apt-get install -y libreoffice-calc poppler-utils")
    if not xlsx.is_file():
        raise RuntimeError(f"{xlsx}: no such file")
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob(f"{xlsx.stem}-*.png"):  # pages of an earlier, longer render would mislead
        old.unlink()
    # A private LibreOffice profile: with a shared one, a second soffice hands the job to a running one and exits.
    with tempfile.TemporaryDirectory(prefix="lo-profile-") as profile:
        done = subprocess.run(
            ["soffice", f"-env:UserInstallation=file://{profile}", "--headless", "--convert-to", "pdf",
             "--outdir", str(outdir), str(xlsx)], capture_output=True, text=True, timeout=timeout)
    pdf = outdir / f"{xlsx.stem}.pdf"
    if done.returncode != 0 or not pdf.is_file():
        raise RuntimeError(f"soffice could not convert {xlsx}: {(done.stderr or done.stdout).strip()[-300:]}")
    subprocess.run(["pdftoppm", "-png", "-r", str(dpi), str(pdf), str(outdir / xlsx.stem)], check=True,
                   timeout=timeout)
    pages = sorted(outdir.glob(f"{xlsx.stem}-*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return pdf, pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xlsx", type=Path, help="the workbook to render")
    parser.add_argument("outdir", type=Path, help="where the PDF and the PNG pages go")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)
    try:
        pdf, pages = render(args.xlsx, args.outdir, args.dpi)
    except (RuntimeError, subprocess.SubprocessError) as err:
        print(f"render_workbook: {err}", file=sys.stderr)
        return 1
    for path in [pdf, *pages]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
