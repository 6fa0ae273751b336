"""The result of matching one point (torch-free, so that the Slicer GUI process can hold it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .coords import PhysicalPoint


@dataclass(frozen=True)
class MatchResult:
    template_point: PhysicalPoint
    query_point: PhysicalPoint
    score: float
    confident: bool
    reason: Optional[str]
    method: str
    details: dict = field(default_factory=dict)
    answer: str = "sam"  # which answer query_point is: 'sam' (embedding match), 'refined' (local
    # registration), 'arbiter' (the pair's local fixed-point fit, samv2core.arbiter) or 'registration'
    # (the pair's verified registration, samv2core.pair_registration)
    answer_reason: Optional[str] = None  # why that answer was used (method 'refined')

    def to_dict(self, system: str = "LPS") -> dict:
        return {"template_point": list(self.template_point.to(system).xyz),
                "query_point": list(self.query_point.to(system).xyz), "coordinate_system": system,
                "score": round(self.score, 4), "confident": self.confident, "reason": self.reason,
                "method": self.method, "answer": self.answer, "answer_reason": self.answer_reason,
                "details": self.details}
