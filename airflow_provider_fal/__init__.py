"""Apache Airflow provider for fal.ai model APIs.

Importing this package is cheap: it pulls in nothing from Airflow. Import the hook,
operators and triggers from their own modules.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
