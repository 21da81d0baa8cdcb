"""The three questions of the paper's reader study, each scored on a 5-point Likert scale from −2 to 2."""

from __future__ import annotations

QUESTIONS: tuple[str, ...] = ("fidelity", "features", "artifacts")
PROMPTS: dict[str, str] = {
    "fidelity": "Image fidelity: how closely does the right image resemble the left (overall, detail, quality)?",
    "features": "Clinical features: are anatomy, abnormalities and other diagnostic features as clear as on the left?",
    "artifacts": "Artifacts: is the right image free of distortion, noise, blur or structures absent on the left?",
}
SHORT: dict[str, str] = {"fidelity": "Image fidelity", "features": "Clinical features", "artifacts": "No artifacts"}
SCORES: tuple[int, ...] = (-2, -1, 0, 1, 2)
LABELS: dict[int, str] = {-2: "very poor", -1: "poor", 0: "acceptable", 1: "good", 2: "excellent"}
