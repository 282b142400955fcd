"""Ray entry point of batch segmentation (see ``nvseg_ray/batch/cli.py`` for the options).

    python jobs/batch_segment.py --input s3://bkt/ct/ --output s3://bkt/masks/ --modality CT_BODY \\
        --checkpoint s3://bkt/models/model.pt
    ray job submit --working-dir . -- python jobs/batch_segment.py ...
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # a checkout used without `pip install -e .` (e.g. a bare `ray job submit --working-dir .`)
    import nvseg_ray  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvseg_ray.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
