package queueboard

import (
	"maps"
	"strings"
	"testing"
)

func TestBoardSumsTheOthers(t *testing.T) {
	b := New()
	a, aChanged := b.Join()
	c, cChanged := b.Join()
	if err := b.Report(a, map[string]int64{"h:8000": 3000, "h:8001": 0}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cChanged:
	default:
		t.Fatal("c was not told of a's report")
	}
	select {
	case <-aChanged:
		t.Fatal("a was told of its own report")
	default:
	}
	if got := b.Others(c); !maps.Equal(got, map[string]int64{"h:8000": 3000}) {
		t.Fatalf("c sees %v; want a's 3000 on h:8000 (zero counts left out)", got)
	}
	if got := b.Others(a); len(got) != 0 {
		t.Fatalf("a sees %v; want nothing (only a reported)", got)
	}
	if err := b.Report(c, map[string]int64{"h:8000": 500}); err != nil {
		t.Fatal(err)
	}
	if got := b.Others(a)["h:8000"]; got != 500 {
		t.Fatalf("a sees %d; want c's 500", got)
	}
	// The same report again tells nobody.
	<-aChanged
	if err := b.Report(c, map[string]int64{"h:8000": 500}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-aChanged:
		t.Fatal("an unchanged report woke a")
	default:
	}
	b.Leave(c)
	<-aChanged
	if got := b.Others(a); len(got) != 0 || b.Routers() != 1 {
		t.Fatalf("after c left a sees %v with %d routers; want nothing, 1", got, b.Routers())
	}
}

func TestBoardRejectsBadReports(t *testing.T) {
	b := New()
	id, _ := b.Join()
	if err := b.Report(id, map[string]int64{"h:8000": 100}); err != nil {
		t.Fatal(err)
	}
	many := map[string]int64{}
	for i := range MaxEndpoints + 1 {
		many[strings.Repeat("x", i%50+1)+string(rune('a'+i%26))+strings.Repeat("y", i/26)] = 1
	}
	for name, r := range map[string]map[string]int64{
		"negative":  {"h:8000": -1},
		"no name":   {"": 5},
		"long name": {strings.Repeat("h", MaxNameBytes+1): 5},
		"too many":  many,
	} {
		if len(r) == 0 {
			t.Fatalf("%s: empty case", name)
		}
		if err := b.Report(id, r); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	other, _ := b.Join()
	if got := b.Others(other)["h:8000"]; got != 100 {
		t.Fatalf("after bad reports the good one reads %d; want 100 (a bad report changes nothing)", got)
	}
}
