"""Which relations the probe builder knows, how each is asked, and how they compose.

A :class:`Relation` is a Wikidata property as CounterFact and known_1000 phrase it:

- ``phrasings``: the ``{}`` templates of edit prompts that ask it (how a CounterFact record in
  the flattened format, which has no ``relation_id``, is recognised); a template that two
  relations share (``"{} is located in"``) is left out of both;
- ``query``: the one prompt used to ask the relation of any subject (the "does the model know
  this fact" filter and the last hop of a portability question);
- ``noun``: a noun phrase for "the object of this relation for {}", used to nest a relation
  inside a longer question ("the city where {} worked");
- ``inverse``: a prompt about the *object* whose answer is the subject, for relations where
  that is a natural question (``"{} is the capital of"``), else ``None``;
- ``subject_type`` / ``object_type``: coarse entity types; a hop may follow another only when
  its subject type is the previous hop's object type.

:data:`COUNTERFACT` is the schema of the shared CounterFact and known_1000 files: which
relations can be edited, and which are the known facts ("hops") a portability question may
chain after the edited one. ``derived`` lists facts read backwards: ``("P36", "P17")`` says a
country's capital is a city in that country.
"""

from __future__ import annotations

from dataclasses import dataclass

from interp_edit.errors import InterpEditError


@dataclass(frozen=True)
class Relation:
    """One relation: how edit prompts phrase it, how to ask it, nest it and invert it."""

    rid: str
    subject_type: str
    object_type: str
    query: str
    noun: str
    phrasings: tuple[str, ...] = ()
    inverse: str | None = None

    def __post_init__(self) -> None:
        for name in ("query", "noun", *(("inverse",) if self.inverse else ())):
            if getattr(self, name).count("{}") != 1:
                raise InterpEditError(f"relation {self.rid}: {name} needs exactly one '{{}}'")


@dataclass(frozen=True)
class Schema:
    """Relations, the ones whose facts may serve as hops, and facts read backwards."""

    relations: tuple[Relation, ...]
    hops: tuple[str, ...]
    derived: tuple[tuple[str, str], ...] = ()
    max_hops: int = 2

    def __post_init__(self) -> None:
        ids = [r.rid for r in self.relations]
        unknown = sorted({*self.hops, *(x for pair in self.derived for x in pair)} - set(ids))
        if len(set(ids)) != len(ids) or unknown:
            raise InterpEditError(f"schema: duplicate relation ids or unknown ones {unknown}")

    def __getitem__(self, rid: str) -> Relation:
        for r in self.relations:
            if r.rid == rid:
                return r
        raise InterpEditError(f"relation {rid!r} is not in the schema")

    def relation_of(self, template: str) -> str | None:
        """The relation whose phrasings include ``template`` (None if none does)."""
        found = {r.rid for r in self.relations if template in r.phrasings}
        return found.pop() if len(found) == 1 else None

    def chains(self, first: str) -> list[tuple[str, ...]]:
        """Hop sequences (1 to ``max_hops`` long) that may follow relation ``first``: each
        hop's subject type is the previous object type, and no hop reads the one before it
        backwards (a capital's country is where the chain started)."""
        out: list[tuple[str, ...]] = []

        def grow(chain: tuple[str, ...]) -> None:
            last = chain[-1] if chain else first
            for rid in self.hops:
                back = (last, rid) in self.derived
                if self[rid].subject_type == self[last].object_type and not (chain and back):
                    out.append((*chain, rid))
                    if len(chain) + 1 < self.max_hops:
                        grow((*chain, rid))

        grow(())
        return out

    def question(self, first: str, chain: tuple[str, ...]) -> str:
        """The prompt about the edit's subject whose answer is the end of ``chain``: the last
        hop's query around the nested noun phrases ("The capital of the country of the city
        where {} worked is")."""
        phrase = self[first].noun
        for rid in chain[:-1]:
            phrase = self[rid].noun.replace("{}", phrase)
        query = self[chain[-1]].query
        if query.startswith("{}"):
            phrase = phrase[0].upper() + phrase[1:]
        return query.replace("{}", phrase)


def _r(rid, subject_type, object_type, query, noun, phrasings=(), inverse=None) -> Relation:
    return Relation(rid, subject_type, object_type, query, noun, tuple(phrasings), inverse)


_CITY_OF = ("person", "city")
COUNTERFACT = Schema(
    relations=(
        _r("P36", "country", "city", "The capital of {} is", "the capital of {}",
           ("The capital of {} is", "The capital city of {} is", "{}'s capital city is",
            "{}'s capital city,", "{}'s capital is", "{}'s capital,",
            "{}, which has the capital", "{}, which has the capital city"),
           inverse="{} is the capital of"),
        _r("P17", "city", "country", "{} is located in the country of", "the country of {}",
           ("{} is located in the country of",)),
        _r("P37", "country", "language", "The official language of {} is",
           "the official language of {}",
           ("The official language of {} is", "In {}, the language spoken is",
            "In {}, an official language is", "The law in {} declares the language")),
        _r("P30", "country", "continent", "{} is located in the continent of",
           "the continent of {}",
           ("{} is located in the continent", "{} belongs to the continent of",
            "{} is a part of the continent of")),
        _r("P159", "company", "city", "The headquarters of {} are in the city of",
           "the city where {} is headquartered",
           ("The headquarter of {} is in", "The headquarter of {} is located in",
            "The headquarters of {} is in", "{}'s headquarters are in",
            "{} is headquartered in", "{} is based in", "{}, whose headquarters are in"),
           inverse="{} is home to the headquarters of"),
        _r("P937", *_CITY_OF, "{} worked in the city of", "the city where {} worked",
           ("{} worked in", "{} worked in the city of", "{} took up work in",
            "{} used to work in", "{} was employed in", "{} found employment in")),
        _r("P20", *_CITY_OF, "{} died in the city of", "the city where {} died",
           ("{} died at", "{} died in", "{} died in the city of", "{} expired at",
            "{} passed away at", "{} passed away in", "{} lost their life at",
            "{} succumbed at", "{}'s life ended in")),
        _r("P19", *_CITY_OF, "{} was born in the city of", "the city where {} was born",
           ("{} was born in", "{} is native to", "{} is originally from",
            "{} originated from", "{} originates from", "{} was native to",
            "{} was originally from")),
        _r("P190", "city", "city", "The twin city of {} is", "the twin city of {}",
           ("{} is a twin city of", "What is the twin city of {}? It is",
            "The twin city of {} is"),
           inverse="{} is a twin city of"),
        _r("P27", "person", "country", "{} is a citizen of", "the country {} is a citizen of",
           ("{} is a citizen of", "{}, a citizen of", "{} has a citizenship from",
            "{} holds a citizenship from", "{}, who has a citizenship from",
            "{}, who holds a citizenship from", "{}, who is a citizen of")),
        _r("P495", "work", "country", "{} was created in the country of",
           "the country where {} was created",
           ("{} was created in the country of", "{}, that was from")),
        _r("P176", "product", "company", "{} is developed by", "the company that developed {}",
           ("{} is developed by", "{} is created by", "{}, developed by", "{}, created by",
            "{} is produced by", "{}, produced by", "{} is a product of",
            "{} was a product of", "{} was created by", "{} was developed by",
            "{}, a product created by", "{}, a product developed by",
            "{}, a product manufactured by", "{}, a product of"),
           inverse="{} is the developer of"),
        _r("P449", "show", "company", "{} premiered on the network",
           "the network on which {} premiered",
           ("{} debuted on", "{} premiered on", "{} premieres on", "{} was released on",
            "{} was originally aired on", "{} is to debut on")),
        _r("P108", "person", "company", "{} works for", "the employer of {}",
           ("{} is employed by", "{} works for", "{}, who is employed by",
            "{}, who works for")),
        _r("P138", "thing", "thing", "{} is named after", "the namesake of {}",
           ("{} is named after", "{} is named for", "{} was named after", "{} was named for",
            "{}, named after", "{}, named for", "{}, which is named after",
            "{}, which is named for", "{}, which was named after", "{}, which was named for",
            "{} is called after", "{} was called after", "{}, called after",
            "{}, which is called after", "{}, which was called after"),
           inverse="{} gave its name to"),
    ),
    hops=("P17", "P36", "P37", "P30", "P159"),
    derived=(("P36", "P17"),),
)
