"""Framework-free data preparation: records -> conversations -> tokens + loss masks -> cache."""
