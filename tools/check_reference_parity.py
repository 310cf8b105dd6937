"""Check fiber-det against a golden fixture of the official FIBER code.

    python tools/check_reference_parity.py --fixture ../shared/fixtures/fiber_ref_v2_single.pt
    python tools/check_reference_parity.py --fixture ../shared/fixtures/fiber_coarse_ref_dev.pt
    python tools/check_reference_parity.py --fixture ../shared/fixtures/fiber_ref_v2_single.pt \
        --opts MODEL.FIBER.SDPA False     # an option that must keep parity, switched

Recognises the fixture by its contents: a fine-grained detector fixture (FIXTURE_FORMAT.md) or a
coarse-grained image-text fixture (COARSE_FIXTURE_FORMAT.md, it stores ITC outputs). Builds the
model from the fixture's official config, converts its official state dict, runs eval and train
modes on the fixture's inputs and compares every captured tensor with the fixture's tolerances.
Prints one line per tensor (key path, max abs diff, tolerance, OK/FAIL) and a final ``PARITY OK``
/ ``PARITY FAIL`` summary with the worst diff/tolerance ratio; exits 0 only if everything passes.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fiber_det  # noqa: E402,F401  (registers the model)
from fiber_det.checkpoint.coarse_parity import check_coarse_fixture, is_coarse_fixture  # noqa: E402
from fiber_det.checkpoint.parity import check_fixture, load_fixture  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True, help="path of a fixture .pt file (FIXTURE_FORMAT.md or COARSE_FIXTURE_FORMAT.md)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the fixture's own files)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of the model built from the fixture (options that keep parity)")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"--opts needs KEY VALUE pairs, got {len(args.opts)} items")
    fixture = load_fixture(args.fixture)
    check = check_coarse_fixture if is_coarse_fixture(fixture) else check_fixture
    results = check(fixture, args.tokenizer, args.opts)
    for r in results:
        print(r.line())
    checked = [r for r in results if not r.skipped]
    failed = [r for r in checked if not r.ok]
    worst = max(checked, key=lambda r: r.ratio)
    verdict = "PARITY FAIL" if failed else "PARITY OK"
    print(f"{verdict}: {len(checked) - len(failed)}/{len(checked)} passed, {len(failed)} failed, "
          f"{len(results) - len(checked)} skipped; worst diff/tolerance ratio {worst.ratio:.3g} at {worst.key}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
