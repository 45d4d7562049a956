// Intentionally empty: this manifest only fetches sources.
